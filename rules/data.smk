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


# Read, check and split the dataset into a folder of its own settings
# (results/data/prepared/<settings hash>): a data job that fails never touches the data the
# later steps read, nor Snakemake's record of it, so going back to the settings that worked
# has nothing to rerun.
rule prepare_data:
    input:
        **dataset_files(),
    output:
        train=f"{PREPARED_DATA}/train.jsonl",
        eval=f"{PREPARED_DATA}/eval.jsonl",
        stats=f"{PREPARED_DATA}/stats.json",
    log:
        "results/logs/prepare_data.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        dataset=CONFIG["dataset"],
    script:
        "../scripts/jobs/prepare_data.py"


# The data the later steps read: replaced only where the bytes differ (update: Snakemake keeps
# the old file for the comparison); tokenize, which reads it, likewise.
rule use_prepared_data:
    input:
        **rules.prepare_data.output,
    output:
        train=update("results/data/train.jsonl"),
        eval=update("results/data/eval.jsonl"),
        stats=update("results/data/stats.json"),
    log:
        "results/logs/use_prepared_data.log",
    conda:
        "../envs/loranotes.yaml"
    script:
        "../scripts/jobs/use_prepared_data.py"


# Outputs replaced only where the bytes differ. As a checkpoint, Snakemake decides again after
# it whether the training runs on it still need to run: tokens with the checksums it recorded
# for them retrain nothing.
checkpoint tokenize:
    input:
        train="results/data/train.jsonl",
        eval="results/data/eval.jsonl",
        model=lambda w: model_files(tokenized_settings(w)["model_name"]),
    output:
        train=update("results/tokenized/{tokenized}/train.parquet"),
        eval=update("results/tokenized/{tokenized}/eval.parquet"),
        stats=update("results/tokenized/{tokenized}/stats.json"),
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
