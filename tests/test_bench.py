"""bench/speed.py's workloads and trainer configurations, on the CPU: what a GPU call would run
must at least build and train, so a device call is not lost to a typo."""

import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import profile_step  # noqa: E402
import speed  # noqa: E402

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    config = AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("bench") / "tiny"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setattr(speed, "DEVICE", "cpu")


def test_ultrachat_workload_gives_every_run_the_same_conversations(shared_fixtures):
    lengths = speed.conversation_lengths(shared_fixtures / "ultrachat_sample.jsonl", 1024)
    assert len(lengths) > 100 and max(lengths) <= 1024 and min(lengths) >= 8
    batches = speed.ultrachat_batches(97, 4, lengths, count=5, batch_tokens=4096)
    for padded, packed in zip(batches["padded"], batches["packed"]):
        real = padded["attention_mask"].sum(1).tolist()
        assert packed["input_ids"].numel() == sum(real)  # packing drops exactly the padding
        assert packed["cu_seq_lens_q"].tolist()[1:] == torch.tensor(real).cumsum(0).tolist()
    budget_tokens = [batch["input_ids"].numel() for batch in batches["budget"]]
    assert len(budget_tokens) == 5 and max(budget_tokens) <= 4096
    # the token budget holds more conversations per step than 4 of them padded
    assert sum(budget_tokens) > sum(int(b["attention_mask"].sum()) for b in batches["padded"])


CONFIGURATIONS = {
    "trainer": {},
    **speed.ABLATIONS["fixed"],
    **speed.ABLATIONS["ultrachat"],
    **{f"profile: {name}": options for name, (options, _) in profile_step.VARIATIONS.items()},
}


@pytest.mark.parametrize("options", CONFIGURATIONS.values(), ids=CONFIGURATIONS)
def test_every_trainer_configuration_of_the_bench_trains(tiny_model_dir, options):
    batches = speed.fixed_batches(97, 2, 16)
    batch = batches["packed" if options.get("packing", True) else "padded"][0]
    model, step, used = speed.trainer_model(tiny_model_dir, "none", options, batch, None)
    losses = [step(batch) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert used["checkpointed"] == (2 if options.get("gradient_checkpointing") is True else 0)


def test_attention_and_mlp_compile_ablation_trains_like_eager(monkeypatch):
    """The bench's ablation (the earlier compile_decoder_layers): attention and MLP compiled on
    their own give the eager loss and gradients (on the CPU's compiler), without graph breaks."""
    import torch._dynamo

    from test_speedups import LORA, assert_same, examples, loss_and_grads, tiny_model
    from speedups import checkpoint_layers
    from train import attach_lora, pack

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=True)
    model.train()
    checkpoint_layers(model, 1)
    batch = pack(examples(), pad_id=0, device="cpu")
    eager = loss_and_grads(model, batch)
    speed.compile_attention_and_mlp(model)
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # it must fail here
    try:
        assert_same(loss_and_grads(model, batch), eager)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # attention and MLP
        assert not torch._dynamo.utils.counters["graph_break"]
    finally:
        torch._dynamo.reset()


def test_repeated_key_heads_ablation_computes_the_same_attention():
    from test_speedups import reference_varlen_attn

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(10, 4, 8, generator=generator)
    key, value = torch.randn(2, 10, 2, 8, generator=generator)
    bounds = torch.tensor([0, 4, 10], dtype=torch.int32)
    native = reference_varlen_attn(query, key, value, bounds, bounds, 6, 6, enable_gqa=True, is_causal=True)
    copied = speed.repeat_key_heads(reference_varlen_attn)(query, key, value, bounds, bounds, 6, 6,
                                                            enable_gqa=True, is_causal=True)
    assert torch.allclose(native, copied, atol=1e-6)
