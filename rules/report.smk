rule collect_metrics:
    input:
        metrics=run_files("metrics.json"),
    output:
        report(
            "results/metrics.csv",
            caption="../report/metrics.rst",
            category="Numbers",
        ),
    log:
        "results/logs/collect_metrics.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        runs=[{"variant": VARIANTS[v], "seed": seed} for v, seed in runs()],
    script:
        "../scripts/jobs/collect_metrics.py"


# Mean and spread over seeds per variant, and every comparison with its confidence interval.
rule compare_variants:
    input:
        metrics="results/metrics.csv",
    output:
        summary=report(
            "results/summary.csv",
            caption="../report/summary.rst",
            category="Numbers",
        ),
        comparisons=report(
            "results/comparisons.csv",
            caption="../report/comparisons.rst",
            category="Numbers",
        ),
    log:
        "results/logs/compare_variants.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        variants=list(VARIANTS),
        comparisons=CONFIG["comparisons"],
        parents={name: v["parent"] for name, v in VARIANTS.items()},
    script:
        "../scripts/jobs/compare_variants.py"


rule plot_comparison:
    input:
        logs=lambda w: run_files("train_log.csv", get_plot_variants(w)),
        metrics=lambda w: run_files("metrics.json", get_plot_variants(w)),
    output:
        report(
            "results/plots/{name}.png",
            caption="../report/plot.rst",
            category="Curves",
        ),
    log:
        "results/logs/plot/{name}.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        runs=lambda w: runs(get_plot_variants(w)),
        titles=lambda w: {v: VARIANTS[v]["title"] for v in get_plot_variants(w)},
        # one colour per variant in every plot: its place in the config
        colors=lambda w: {v: list(VARIANTS).index(v) for v in get_plot_variants(w)},
        title=lambda w: comparison_plots()[w.name]["title"],
    script:
        "../scripts/jobs/plot_loss.py"


rule report:
    input:
        template="report/report.md.j2",
        metrics="results/metrics.csv",
        summary="results/summary.csv",
        comparisons="results/comparisons.csv",
        data_stats="results/data/stats.json",
        token_stats=[tokenized_files(v)["stats"] for v in VARIANTS],
        before=[before_samples(v) for v in VARIANTS],
        after=[after_samples(v) for v in VARIANTS],
        plots=expand("results/plots/{name}.png", name=comparison_plots()),
    output:
        report(
            "results/report.md",
            caption="../report/report.rst",
            category="Lab notes",
        ),
    log:
        "results/logs/report.log",
    conda:
        "../envs/loranotes.yaml"
    params:
        config=CONFIG,
        plot_titles=[plot["title"] for plot in comparison_plots().values()],
    script:
        "../scripts/jobs/render_report.py"
