rule collect_metrics:
    input:
        metrics=expand("results/variants/{variant}/metrics.json", variant=VARIANTS),
    output:
        "results/metrics.csv",
    log:
        "results/logs/collect_metrics.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        variants=list(VARIANTS.values()),
    script:
        "../scripts/collect_metrics.py"


rule plot_comparison:
    input:
        logs=lambda w: expand(
            "results/variants/{variant}/train_log.csv",
            variant=comparison_plots()[w.name]["variants"],
        ),
    output:
        "results/plots/{name}.png",
    log:
        "results/logs/plot/{name}.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        names=lambda w: comparison_plots()[w.name]["variants"],
        titles=lambda w: [
            VARIANTS[v]["title"] for v in comparison_plots()[w.name]["variants"]
        ],
        title=lambda w: comparison_plots()[w.name]["title"],
    script:
        "../scripts/plot_loss.py"


rule report:
    input:
        template="report/report.md.j2",
        metrics="results/metrics.csv",
        data_stats="results/data/stats.json",
        token_stats=[tokenized_files(v)["stats"] for v in VARIANTS],
        before=[before_samples(v) for v in VARIANTS],
        after=expand("results/variants/{variant}/samples_after.json", variant=VARIANTS),
        plots=expand("results/plots/{name}.png", name=comparison_plots()),
    output:
        "results/report.md",
    log:
        "results/logs/report.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        config=CONFIG,
        plot_titles=[plot["title"] for plot in comparison_plots().values()],
    script:
        "../scripts/render_report.py"
