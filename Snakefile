# loranotes: LoRA / QLoRA fine-tuning variants in, lab notes (results/report.md) out.
#
#   snakemake --cores 1 results/report.md                        # the embedded default, offline
#   snakemake --cores 1 --configfile configs/seed.yaml results/report.md


# A --configfile replaces the embedded default instead of being merged into it, so the seed
# experiment does not inherit the tiny models and variants of config.yaml.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/models.smk"
include: "rules/train.smk"
include: "rules/generate.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/report.md",
