rule bundled_sample:
    input:
        knowledge=KNOWLEDGE_FILE,
    output:
        BUNDLED_SAMPLE,
    log:
        "results/logs/bundled_sample.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        n=CONFIG["dataset"]["bundled_size"],
        seed=CONFIG["dataset"]["seed"],
        topics=CONFIG["dataset"]["bundled_topics"],
    script:
        "../scripts/jobs/bundled_sample.py"


rule prepare_data:
    input:
        **dataset_files(),
    output:
        train="results/data/train.jsonl",
        eval="results/data/eval.jsonl",
        stats="results/data/stats.json",
    log:
        "results/logs/prepare_data.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        dataset=CONFIG["dataset"],
    script:
        "../scripts/jobs/prepare_data.py"


rule tokenize:
    input:
        train="results/data/train.jsonl",
        eval="results/data/eval.jsonl",
        model=lambda w: model_files(tokenized_settings(w)["model_name"]),
    output:
        train="results/tokenized/{tokenized}/train.parquet",
        eval="results/tokenized/{tokenized}/eval.parquet",
        stats="results/tokenized/{tokenized}/stats.json",
    log:
        "results/logs/tokenize/{tokenized}.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        model=lambda w: MODELS[tokenized_settings(w)["model_name"]],
        model_path=lambda w: model_path(tokenized_settings(w)["model_name"]),
        max_length=lambda w: tokenized_settings(w)["max_length"],
    script:
        "../scripts/jobs/tokenize_data.py"
