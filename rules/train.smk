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
    params:
        # Every setting that shapes the run is a param, so changing one reruns this variant only.
        variant=lambda w: {
            key: VARIANTS[w.variant][key]
            for key in ("model", "quantization", "training", "lora")
        },
        model_path=lambda w: model_path(VARIANTS[w.variant]["model"]),
        trust_remote_code=lambda w: MODELS[VARIANTS[w.variant]["model"]]["trust_remote_code"],
    threads: 2
    conda:
        "../envs/loranotes.yaml"
    script:
        "../scripts/train.py"
