"""Capacity planning without weights: the seed's models rebuilt from their real configs."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from build_model import build_model
from model_sources import KNOWN_ARCHITECTURES, ModelError, architecture_spec, build_on_meta, weights_phrase
from modeling import peak_memory

# Public parameter counts of the two seed models.
PUBLISHED_PARAMETERS = {"Qwen/Qwen3-4B": 4_022_468_096, "meta-llama/Llama-2-7b-hf": 6_738_415_616}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED_PARAMETERS))
def test_random_weights_rebuild_the_real_architecture_offline(hub_id):
    model = build_on_meta({"path": hub_id}, weights="random")  # no network, no memory
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[hub_id]


def test_without_random_weights_a_hub_model_is_not_rebuilt():
    assert architecture_spec({"path": "Qwen/Qwen3-4B"}, weights="pretrained") is None


def test_an_unknown_hub_model_cannot_be_planned_offline():
    with pytest.raises(ModelError, match="not known offline"):
        architecture_spec({"path": "someone/unknown-model"}, weights="random")


def test_build_at_reduced_depth_keeps_the_real_layer_shapes(tmp_path):
    # Qwen3-4B's real config at 1 layer: the embedding and the layer are full size.
    spec = {**KNOWN_ARCHITECTURES["Qwen/Qwen3-4B"], "num_hidden_layers": 1}
    texts = ["A short conversation about LoRA.", "Another one, about quantization."] * 50
    info = build_model(spec, texts, tmp_path / "qwen3-1layer")
    assert info["weights"] == "random" and info["random_init"] is True
    assert weights_phrase(info) == "random weights (capacity planning)"
    config = json.loads((tmp_path / "qwen3-1layer" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim"):
        assert config[key] == KNOWN_ARCHITECTURES["Qwen/Qwen3-4B"][key], key
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3-1layer")
    assert model.model.layers[0].mlp.down_proj.weight.shape == (2560, 9728)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "qwen3-1layer")
    assert tokenizer.chat_template and len(tokenizer) <= config["vocab_size"]


def test_cpu_memory_is_labelled_as_rss():
    memory = peak_memory(torch.device("cpu"))
    assert memory["memory_kind"] == "CPU peak RSS"
    assert memory["peak_reserved_gb"] is None
    assert 0.05 < memory["peak_memory_gb"] < 24  # this process, in GB
