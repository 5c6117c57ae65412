"""Variant inheritance and config checks (scripts/experiment_config.py), and that `snakemake -n` stops on
a bad config with the same message."""

import copy

import pytest
import yaml

from conftest import REPO, copy_workflow, run_snakemake
from experiment_config import ConfigError, resolve_config, run_training

SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
SCHEMA_PATH = REPO / "schemas" / "config.schema.yaml"


def base_config():
    return {
        "dataset": {"source": "bundled"},
        "prompts": ["Hi"],
        "training": {"steps": 10, "lr": 1.0e-3},
        "lora": {"r": 2},
        "models": {
            "small": {"init": {"architecture": "llama"}},
            "large": {"path": "org/large", "prompt_format": "seed"},
        },
        "variants": {
            "v1": {
                "title": "base",
                "model": "small",
                "quantization": "nf4",
                "training": {"max_length": 128},
                "lora": {"alpha": 8},
            },
            "v2": {"from": "v1", "quantization": "none"},
            "v3": {"from": "v2", "training": {"lr": 1.0e-4}, "lora": {"r": 8}},
            "v4": {"from": "v1", "model": "large"},
        },
        "comparisons": [{"name": "v2_vs_v1", "variants": ["v2", "v1"]}],
    }


@pytest.fixture
def resolved():
    return resolve_config(base_config(), "exp.yaml")["variants"]


def test_child_inherits_model_quantization_training_and_lora(resolved):
    v1, v2 = resolved["v1"], resolved["v2"]
    assert v2["parent"] == "v1" and v1["parent"] is None
    assert v2["model"] == v1["model"] == "small"
    assert v2["training"] == v1["training"] and v2["training"]["max_length"] == 128
    assert v2["lora"] == v1["lora"] and v2["lora"]["alpha"] == 8
    assert (v1["quantization"], v2["quantization"]) == ("nf4", "none")
    assert v2["title"] == "v2"  # titles are not inherited: the name stands in


def test_overrides_replace_single_keys_and_keep_the_rest(resolved):
    v2, v3 = resolved["v2"], resolved["v3"]
    assert v3["training"]["lr"] == 1.0e-4
    assert v3["lora"]["r"] == 8
    assert {k: v for k, v in v3["training"].items() if k != "lr"} == {
        k: v for k, v in v2["training"].items() if k != "lr"
    }
    assert v3["lora"]["alpha"] == 8 and v3["lora"]["target_modules"] == v2["lora"]["target_modules"]
    assert v3["quantization"] == "none"  # from v2, which overrode v1
    assert resolved["v4"]["model"] == "large" and resolved["v4"]["quantization"] == "nf4"


def test_changes_list_what_differs_from_the_parent(resolved):
    assert resolved["v1"]["changes"] == []
    assert resolved["v2"]["changes"] == [{"key": "quantization", "from": "nf4", "to": "none"}]
    assert resolved["v3"]["changes"] == [
        {"key": "training.lr", "from": 1.0e-3, "to": 1.0e-4},
        {"key": "lora.r", "from": 2, "to": 8},
    ]
    assert resolved["v4"]["changes"] == [{"key": "model", "from": "small", "to": "large"}]


def test_global_training_and_lora_reach_root_variants(resolved):
    v1 = resolved["v1"]
    assert v1["training"]["steps"] == 10 and v1["training"]["lr"] == 1.0e-3
    assert v1["lora"]["r"] == 2


def schema_defaults(properties):
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def test_defaults_fill_every_setting_the_schema_documents():
    config = resolve_config(base_config())
    # Every training and lora key is set for every variant, so runs are fully specified; the
    # seeds are the variant's runs, each run's training gets its own seed (run_training).
    for variant in config["variants"].values():
        assert variant["seeds"] == [0]
        assert set(run_training(variant, 0)) | {"seeds"} == set(SCHEMA["$defs"]["training"]["properties"])
        assert set(variant["lora"]) == set(SCHEMA["$defs"]["lora"]["properties"])
    # The defaults the schema documents are the ones applied.
    properties = SCHEMA["properties"]
    for section in ("dataset", "generation"):
        defaults = schema_defaults(properties[section]["properties"])
        assert {k: config[section][k] for k in defaults} == defaults, section
    model_defaults = schema_defaults(properties["models"]["additionalProperties"]["properties"])
    assert config["models"]["small"] | model_defaults == config["models"]["small"]
    assert config["models"]["large"]["prompt_format"] == "seed"  # given, not defaulted
    assert config["weights"] == properties["weights"]["default"]
    config = resolve_config({k: v for k, v in base_config().items() if k != "comparisons"})
    assert config["comparisons"] == properties["comparisons"]["default"]


def test_variants_keep_the_declared_order_and_the_input_is_not_changed():
    config = base_config()
    # A child declared before its parent.
    config["variants"] = {"child": {"from": "root", "lora": {"r": 4}}, "root": {"model": "small"}}
    config["comparisons"] = []
    before = copy.deepcopy(config)
    resolved = resolve_config(config)["variants"]
    assert list(resolved) == ["child", "root"]
    assert resolved["child"]["lora"]["r"] == 4 and resolved["root"]["lora"]["r"] == 2
    assert config == before


def resolve_error(change):
    config = base_config()
    change(config)
    with pytest.raises(ConfigError) as error:
        resolve_config(config, "exp.yaml")
    message = str(error.value)
    assert message.startswith("exp.yaml: "), message
    return message


def test_unknown_parent_names_the_key():
    message = resolve_error(lambda c: c["variants"]["v3"].update({"from": "v9"}))
    assert "variants.v3.from" in message and "'v9' is not a variant" in message


def test_unknown_model_names_the_key():
    message = resolve_error(lambda c: c["variants"]["v4"].update({"model": "huge"}))
    assert "variants.v4.model" in message and "'huge'" in message
    assert "small" in message and "large" in message  # the choices


def test_root_variant_without_model_names_the_key():
    message = resolve_error(lambda c: c["variants"]["v1"].pop("model"))
    assert "variants.v1" in message and "model" in message


@pytest.mark.parametrize(
    "parents, key, cycle",
    [
        ({"v1": "v1"}, "variants.v1.from", "v1 -> v1."),
        ({"v1": "v3"}, "variants.v2.from", "v1 -> v3 -> v2 -> v1."),  # v2 from v1, v3 from v2
    ],
    ids=["self", "three"],
)
def test_inheritance_cycle_names_the_key_and_the_cycle(parents, key, cycle):
    message = resolve_error(
        lambda c: [c["variants"][name].update({"from": parent}) for name, parent in parents.items()]
    )
    assert f"{key}: inheritance cycle {cycle}" in message


def test_comparison_of_an_unknown_variant_names_it():
    message = resolve_error(lambda c: c["comparisons"].append({"name": "x", "variants": ["v1", "v7"]}))
    assert "comparisons[1]" in message and "'v7' is not a variant" in message


def test_duplicate_comparison_names_are_an_error():
    message = resolve_error(lambda c: c["comparisons"].append({"name": "v2_vs_v1", "variants": ["v1"]}))
    assert "v2_vs_v1" in message and "unique" in message


def test_dry_run_stops_on_a_bad_config_with_the_message(tmp_path):
    workdir = copy_workflow(tmp_path / "workflow")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["variants"]["v3"]["from"] = "v9"
    (workdir / "bad.yaml").write_text(yaml.safe_dump(config))

    result = run_snakemake(workdir, "-n", "--configfile", "bad.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "bad.yaml: variants.v3.from: 'v9' is not a variant" in output, output
    assert not (workdir / "results").exists()


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("gradient_checkpointing", "sometimes",
         "training.gradient_checkpointing: 'sometimes' is not one of: auto, true, false"),
        ("memory_budget_gb", 0, "training.memory_budget_gb: "),
        ("fused_kernels", "unsloth", "training.fused_kernels: "),
        ("compile", "yes", "training.compile: "),
        ("packing", "on", "training.packing: "),
    ],
)
def test_speed_options_are_checked_with_the_key_named(setting, value, message):
    from experiment_config import validate_config

    config = base_config()
    config["training"][setting] = value
    with pytest.raises(ConfigError) as error:
        validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")
    assert str(error.value).startswith(f"exp.yaml: {message}")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", ["auto", True, False])
def test_gradient_checkpointing_takes_auto_or_a_boolean(value):
    from experiment_config import validate_config

    config = base_config()
    config["training"].update(gradient_checkpointing=value, memory_budget_gb=12.5)
    validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")
    assert resolve_config(config)["variants"]["v2"]["training"]["gradient_checkpointing"] == value


def test_a_token_budget_needs_packed_batches():
    config = base_config()
    config["variants"]["v3"]["training"].update(batch_tokens=4096, packing=False)
    with pytest.raises(ConfigError, match=r"^exp.yaml: variants.v3.training.batch_tokens: needs "
                                          r"training.packing: true"):
        resolve_config(config, "exp.yaml")
    config["variants"]["v3"]["training"]["packing"] = True
    assert resolve_config(config, "exp.yaml")["variants"]["v3"]["training"]["batch_tokens"] == 4096
    config["variants"]["v3"]["training"]["packing"] = "auto"  # the default: packs for a budget
    assert resolve_config(config, "exp.yaml")["variants"]["v3"]["training"]["packing"] == "auto"


def test_bundled_topics_must_be_topics_of_the_knowledge_table():
    from experiment_config import validate_config

    config = base_config()
    config["dataset"]["bundled_topics"] = ["LoRA", "cooking pasta"]
    validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")  # well-formed
    with pytest.raises(ConfigError, match=r"^exp.yaml: dataset.bundled_topics: 'cooking pasta' not in "
                                          r"scripts/data/knowledge.yaml; its topics: contrastive learning, LoRA"):
        resolve_config(config, "exp.yaml")
    config["dataset"]["bundled_topics"] = "some"
    with pytest.raises(ConfigError, match=r"dataset.bundled_topics: 'some' does not match"):
        validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")


def test_pretrain_settings_are_checked_like_any_other_key():
    from experiment_config import validate_config

    config = base_config()
    config["models"]["small"]["init"]["pretrain"] = {"steps": 10, "learning_rate": 1.0e-3}
    with pytest.raises(ConfigError, match=r"models.small.init.pretrain.learning_rate: unknown key "
                                          r"\(did you mean lr\?\)"):
        validate_config(config, REPO / "schemas" / "config.schema.yaml", "exp.yaml")


def with_training(config, where, **training):
    section = config["variants"][where] if where else config
    section.setdefault("training", {}).update(training)
    return config


def test_seeds_are_a_list_with_seed_as_its_one_run_shorthand_and_variants_override_either():
    config = with_training(base_config(), None, seeds=[0, 1, 2])
    with_training(config, "v2", seed=7)          # one run, seed 7
    with_training(config, "v1", seeds=[3, 1])   # inherited by v2 (overridden), v3 and v4
    resolved = resolve_config(config)["variants"]
    assert resolved["v1"]["seeds"] == [3, 1] == resolved["v4"]["seeds"]
    assert resolved["v2"]["seeds"] == [7] == resolved["v3"]["seeds"]  # v3 is from v2
    assert {"key": "training.seeds", "from": [3, 1], "to": [7]} in resolved["v2"]["changes"]
    config = with_training(base_config(), None, seeds=[0, 1, 2])
    assert resolve_config(config)["variants"]["v3"]["seeds"] == [0, 1, 2]  # the top level's
    # A run's settings hold its own seed and nothing of the other runs: adding a seed to the
    # list leaves the existing runs' settings (the train jobs' params) as they were.
    resolved = resolve_config(config)["variants"]
    assert run_training(resolved["v1"], 2) == {**resolved["v1"]["training"], "seed": 2}
    more = resolve_config(with_training(copy.deepcopy(config), None, seeds=[0, 1, 2, 3]))
    assert run_training(more["variants"]["v1"], 1) == run_training(resolved["v1"], 1)


def test_seed_and_seeds_together_is_an_error_naming_the_key():
    message = resolve_error(lambda c: with_training(c, "v2", seed=1, seeds=[1, 2]))
    assert "variants.v2.training: both seed and seeds are set" in message


def test_seeds_must_be_distinct_non_negative_integers():
    from experiment_config import validate_config

    for seeds, expected in (([], "training.seeds"), ([1, 1], "training.seeds"),
                            ([-1], "training.seeds[0]"), (["0"], "training.seeds[0]")):
        config = with_training(base_config(), None, seeds=seeds)
        with pytest.raises(ConfigError) as error:
            validate_config(config, SCHEMA_PATH, "exp.yaml")
        assert f"exp.yaml: {expected}" in str(error.value), (seeds, str(error.value))
