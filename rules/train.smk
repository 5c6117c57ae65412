# One job per (variant, seed): adding a seed to training.seeds runs only that seed's job.
rule train:
    input:
        unpack(get_train_input),
    output:
        adapter=directory("results/variants/{variant}/seed-{seed}/adapter"),
        steps="results/variants/{variant}/seed-{seed}/train_log.csv",
        metrics="results/variants/{variant}/seed-{seed}/metrics.json",
        # where the run was logged ({} without trackers); generate_after adds its samples there
        tracking="results/variants/{variant}/seed-{seed}/tracking.json",
    log:
        "results/logs/train/{variant}/seed-{seed}.log",
    conda:
        "../envs/loranotes.yaml"
    threads: 2
    resources:
        # training.devices > 1: the job runs torchrun, one rank per GPU (scripts/distributed.py)
        gpu=get_train_gpus,
    params:
        # Every setting that shapes the run is a param, so changing one reruns this run only.
        variant=get_run_settings,
        model_path=lambda w: model_path(get_variant_model(w)),
        trust_remote_code=lambda w: MODELS[get_variant_model(w)]["trust_remote_code"],
        tracking=get_run_tracking,
        # Not an output: Snakemake deletes a failed job's outputs, and a rerun resumes from here.
        checkpoints="results/checkpoints/{variant}/seed-{seed}",
    script:
        "../scripts/jobs/train.py"
