rule train:
    input:
        unpack(lambda w: tokenized_files(w.variant)),
        model=lambda w: model_files(VARIANTS[w.variant]["model"]),
    output:
        adapter=directory("results/variants/{variant}/adapter"),
        steps="results/variants/{variant}/train_log.csv",
        metrics="results/variants/{variant}/metrics.json",
    log:
        "results/logs/train/{variant}.log",
    conda:
        "../envs/loranotes.yaml"
    threads: 2
    params:
        # Every setting that shapes the run is a param, so changing one reruns this variant only.
        variant=lambda w: {
            key: VARIANTS[w.variant][key]
            for key in ("model", "quantization", "training", "lora")
        },
        model_path=lambda w: model_path(VARIANTS[w.variant]["model"]),
        trust_remote_code=lambda w: MODELS[VARIANTS[w.variant]["model"]][
            "trust_remote_code"
        ],
        # Not an output: Snakemake deletes a failed job's outputs, and a rerun resumes from here.
        checkpoints="results/checkpoints/{variant}",
    script:
        "../scripts/train.py"
