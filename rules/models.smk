rule build_model:
    input:
        texts="results/data/bundled_sample.jsonl",
    output:
        model_dir=directory("results/models/{model}"),
    log:
        "results/logs/build_model/{model}.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        model=lambda w: MODELS[w.model],
        weights=CONFIG["weights"],
    script:
        "../scripts/build_model.py"
