rule build_model:
    input:
        texts="results/data/bundled_sample.jsonl",
    output:
        model_dir=directory("results/models/{model}"),
    log:
        "results/logs/build_model/{model}.log",
    params:
        model=lambda w: MODELS[w.model],
        weights=CONFIG["weights"],
    conda:
        "../envs/loranotes.yaml"
    script:
        "../scripts/build_model.py"
