# "Before" samples depend only on the base model and quantization, so variants share them.
rule generate_before:
    input:
        model=lambda w: model_files(w.model),
    output:
        "results/samples/before/{model}__{quant}.json",
    log:
        "results/logs/generate/before_{model}__{quant}.log",
    conda:
        "../envs/loranotes.yaml"
    threads: 2
    params:
        model_name=lambda w: w.model,
        model=lambda w: MODELS[w.model],
        model_path=lambda w: model_path(w.model),
        quantization=lambda w: w.quant,
        prompts=CONFIG["prompts"],
        generation=CONFIG["generation"],
        device=CONFIG["training"]["device"],
    script:
        "../scripts/jobs/generate.py"


# The report shows the "after" samples of each variant's first seed (after_samples).
rule generate_after:
    input:
        model=lambda w: model_files(get_variant_model(w)),
        adapter="results/variants/{variant}/seed-{seed}/adapter",
    output:
        "results/variants/{variant}/seed-{seed}/samples_after.json",
    log:
        "results/logs/generate/after_{variant}_seed-{seed}.log",
    conda:
        "../envs/loranotes.yaml"
    threads: 2
    params:
        model_name=get_variant_model,
        model=lambda w: MODELS[get_variant_model(w)],
        model_path=lambda w: model_path(get_variant_model(w)),
        quantization=lambda w: VARIANTS[w.variant]["quantization"],
        prompts=CONFIG["prompts"],
        generation=CONFIG["generation"],
        device=lambda w: VARIANTS[w.variant]["training"]["device"],
    script:
        "../scripts/jobs/generate.py"
