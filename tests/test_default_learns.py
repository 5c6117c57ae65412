"""The embedded default visibly learns: every variant of config.yaml, run through the workflow as
shipped (the `default_run` fixture; the first seed of each), lowers its held-out loss by at
least 20% relative, and after fine-tuning its models answer in the
conversation format and stop at the end-of-turn token, which the pretrained models never do."""

import json
import re

import pytest
import yaml

from bundled_sample import load_knowledge
from experiment_config import resolve_config


@pytest.fixture(scope="module")
def learned(default_run):
    """The default run's first seed of every variant: its metrics, and the before and after
    samples (the "after" samples are the first seed's)."""
    config = resolve_config(yaml.safe_load((default_run / "config.yaml").read_text()))
    results = default_run / "results"
    runs = {}
    for name, variant in config["variants"].items():
        run = results / "variants" / name / f"seed-{variant['seeds'][0]}"
        after = json.loads((run / "samples_after.json").read_text())
        before = json.loads((results / "samples" / "before" /
                             f"{after['model']}__{after['quantization']}.json").read_text())
        runs[name] = {"metrics": json.loads((run / "metrics.json").read_text()),
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
