"""The embedded default visibly learns: every variant of config.yaml, run through the workflow as
shipped (only reduced to its first training seed, without comparison plots), lowers its
held-out loss by at least 20% relative, and after fine-tuning its models answer in the
conversation format and stop at the end-of-turn token, which the pretrained models never do."""

import json
import re

import pytest
import yaml

from bundled_sample import load_knowledge
from conftest import copy_workflow, run_snakemake


def reduced_default(config):
    """config.yaml as CI runs it: the same models, data, variants and settings; the first
    training seed only, and no comparison plots."""
    config = {**config, "comparisons": []}
    training = dict(config["training"])
    if "seeds" in training:
        training["seeds"] = training["seeds"][:1]
    config["training"] = training
    return config


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("default_learns"))
    config = reduced_default(yaml.safe_load((workdir / "config.yaml").read_text()))
    (workdir / "reduced.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_snakemake(workdir, "results/report.md", "--cores", "2", "--configfile", "reduced.yaml")
    results = workdir / "results"
    runs = {}
    for name in config["variants"]:
        metrics = next(results.glob(f"variants/{name}/**/metrics.json"))
        after = json.loads(next(results.glob(f"variants/{name}/**/samples_after.json")).read_text())
        before = json.loads(next((results / "samples" / "before").glob(
            f"{after['model']}__{after['quantization']}.json")).read_text())
        runs[name] = {"metrics": json.loads(metrics.read_text()),
                      "before": before["samples"], "after": after["samples"]}
    return config, runs


def ends_at_end_of_turn(sample, config):
    """Generation stopped at the end-of-turn token, before running out of new tokens."""
    return sample["new_tokens"] < config["generation"]["max_new_tokens"]


def topic_words(prompt):
    """The words of the knowledge-table topic a prompt asks about ("compound interest")."""
    names = [topic["name"] for topic in load_knowledge()["topics"] if topic["name"].lower() in prompt.lower()]
    assert names, f"no topic of the knowledge table in the prompt {prompt!r}"
    return {word for word in re.findall(r"\w+", names[0].lower()) if word not in {"the", "an", "a"}}


def on_topic(sample):
    return bool(topic_words(sample["prompt"]) & set(re.findall(r"\w+", sample["completion"].lower())))


def test_every_variant_lowers_its_held_out_loss_by_a_fifth(learned):
    _, runs = learned
    for name, run in runs.items():
        before, after = run["metrics"]["eval_loss_before"], run["metrics"]["eval_loss_after"]
        assert after <= 0.8 * before, f"{name}: eval loss {before:.3f} -> {after:.3f}"


def test_only_fine_tuned_models_stop_at_the_end_of_their_turn(learned):
    config, runs = learned
    for name, run in runs.items():
        assert not any(ends_at_end_of_turn(s, config) for s in run["before"]), name
        assert any(ends_at_end_of_turn(s, config) for s in run["after"]), name
    answers = [s for run in runs.values() for s in run["after"]]
    stopped = sum(ends_at_end_of_turn(s, config) for s in answers)
    assert stopped > len(answers) / 2, f"{stopped} of {len(answers)} answers ended at the end of turn"


def test_fine_tuned_answers_are_mostly_about_what_was_asked(learned):
    _, runs = learned
    answers = [s for run in runs.values() for s in run["after"]]
    hits = sum(on_topic(s) for s in answers)
    assert hits > len(answers) / 2, f"{hits} of {len(answers)} answers name their prompt's topic"


def test_built_models_say_they_were_pretrained(learned):
    _, runs = learned
    for name, run in runs.items():
        assert run["metrics"]["random_init"] is False, name
