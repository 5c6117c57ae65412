# Models loranotes builds itself (model_sources.is_built): the `init:` entries, and every model
# under `weights: random`. Pretrained on the bundled knowledge table when `init.pretrain` asks.
rule build_model:
    input:
        conversations="results/data/bundled_sample.jsonl",
        knowledge=KNOWLEDGE_FILE,
    output:
        model_dir=directory("results/models/{model}"),
    log:
        "results/logs/build_model/{model}.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        model=lambda w: MODELS[w.model],
        weights=CONFIG["weights"],
        topics=CONFIG["dataset"]["bundled_topics"],
    script:
        "../scripts/jobs/build_model.py"
