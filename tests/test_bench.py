"""The bench's workloads and trainer configurations (bench/workloads.py, bench/trainers.py), on
the CPU: what a GPU call would run must at least build and train, so a device call is not lost
to a typo; and each configuration must change what a GPU run has on, the way its name says."""

import sys
from dataclasses import asdict, replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import REPO
from experiment_config import TRAINING_DEFAULTS
from speedups import decide_speedups

sys.path.insert(0, str(REPO / "bench"))
import memory_at_peak  # noqa: E402
import profile_step  # noqa: E402
import speed  # noqa: E402
import trainers  # noqa: E402
import workloads  # noqa: E402

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


def test_ultrachat_workload_gives_every_run_the_same_conversations(shared_fixtures):
    lengths = workloads.conversation_lengths(shared_fixtures / "ultrachat_sample.jsonl", 1024)
    assert len(lengths) > 100 and max(lengths) <= 1024 and min(lengths) >= 8
    batches = workloads.ultrachat_batches(97, 4, lengths, count=5, batch_tokens=4096, device="cpu")
    for padded, packed in zip(batches["padded"], batches["packed"]):
        real = padded["attention_mask"].sum(1).tolist()
        assert packed["input_ids"].numel() == sum(real)  # packing drops exactly the padding
        assert packed["cu_seq_lens_q"].tolist()[1:] == torch.tensor(real).cumsum(0).tolist()
    budget_tokens = [batch["input_ids"].numel() for batch in batches["budget"]]
    assert len(budget_tokens) == 5 and max(budget_tokens) <= 4096
    # the token budget holds more conversations per step than 4 of them padded
    assert sum(budget_tokens) > sum(int(b["attention_mask"].sum()) for b in batches["padded"])


CONFIGURATIONS = {
    "trainer": trainers.Configuration(),
    **trainers.ABLATIONS["fixed"],
    **trainers.ABLATIONS["ultrachat"],
    **{f"profile: {name}": configuration for name, configuration in profile_step.VARIATIONS.items()},
}


@pytest.mark.parametrize("configuration", CONFIGURATIONS.values(), ids=CONFIGURATIONS)
def test_every_trainer_configuration_of_the_bench_trains(tiny_model_dir, configuration):
    batches = workloads.fixed_batches(97, 2, 16, device="cpu")
    batch = batches["packed" if configuration.training.get("packing", True) else "padded"][0]
    model, setup, memory = trainers.trainer_model(tiny_model_dir, "none", configuration, batch, None,
                                               device="cpu")
    result = speed.measure(model, setup.step_options, [batch], steps=2, warmup=0)
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    checkpointed = configuration.training.get("gradient_checkpointing") is True
    assert memory.gradient_checkpointing_layers == (2 if checkpointed else 0)


# What each configuration changes in a GPU run's speedups.Speedups record, next to the default
# trainer's (compiled layers with recomputation, fused loss, variable-length flash attention).
NOT_COMPILED = {"compiled": False, "compile_layers": None}
LIGER_INSTEAD = {**NOT_COMPILED, "fused_kernels": True}
NO_VARLEN = {"varlen_attention": False, "attention_kernel": None}
UNFUSED_LOSS = {"fused_loss": False, "target_logits": True}  # logits at the targets only
ON_A_GPU = {
    "trainer": {},
    "precision fixes only (no fused kernels, all layers checkpointed)":
        {**NOT_COMPILED, **UNFUSED_LOSS, "memory_policy": "every layer"},
    "not compiled (Liger's kernels instead)": {**LIGER_INSTEAD, "memory_policy": "whole layers"},
    "each layer's attention and MLP compiled separately (norms and residual adds eager)":
        {"compile_layers": "compile_attention_and_mlp"},
    "whole layers checkpointed instead of recomputation inside the compiled layers":
        {"memory_policy": "whole layers"},
    "copies of each key head for grouped-query attention (repeat_interleave)":
        {"attention_kernel": "varlen_attn_with_copied_key_heads"},
    "no checkpointing (memory not limited)": {"memory_policy": "none"},
    "packed, SDPA block mask instead of variable-length attention": NO_VARLEN,
    "padded batches (packing off)": {**NO_VARLEN, "packed": False},
    "batches of up to 4 x 1024 tokens (training.batch_tokens: 4096)": {},  # other batches
    "profile: trainer (compiled), all layers checkpointed": {"memory_policy": "every layer"},
    "profile: no fused kernels, not compiled":
        {**NOT_COMPILED, **UNFUSED_LOSS, "memory_policy": "every layer"},
    "profile: trainer not compiled (Liger's layer kernels), all layers checkpointed":
        {**LIGER_INSTEAD, "memory_policy": "every layer"},
    "profile: not compiled, no autocast (float32 adapters, peft's casts)":
        {**LIGER_INSTEAD, "memory_policy": "every layer", "bf16_autocast": False},
    "profile: not compiled, padded batch (SDPA, no varlen)":
        {**LIGER_INSTEAD, **NO_VARLEN, "packed": False, "memory_policy": "every layer"},
}


@pytest.mark.parametrize("name", CONFIGURATIONS)
def test_each_configuration_runs_its_alternative_on_a_gpu(name):
    """The compiled, fused and variable-length paths need a GPU; on one (its kind given here,
    so nothing runs) the set-up chooses exactly what the configuration's name says."""
    def on_a_gpu(configuration):
        training = {**TRAINING_DEFAULTS, **configuration.training}
        chosen = decide_speedups(training, "llama", torch.device("cuda"), configuration.options,
                                 varlen_available=True)
        return asdict(chosen)

    default, chosen = on_a_gpu(trainers.Configuration()), on_a_gpu(CONFIGURATIONS[name])
    assert default["compiled"] and default["fused_loss"] and default["varlen_attention"]
    assert {key: value for key, value in chosen.items() if value != default[key]} == ON_A_GPU[name]


def test_attention_and_mlp_compile_ablation_trains_like_eager(monkeypatch):
    """The bench's ablation (the earlier compile_decoder_layers): attention and MLP compiled on
    their own give the eager loss and gradients (on the CPU's compiler), without graph breaks."""
    import torch._dynamo

    from test_speedups import LORA, assert_same, examples, loss_and_grads, tiny_model
    from batches import pack
    from memory_plan import checkpoint_layers
    from speedups import attach_lora

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=True)
    model.train()
    checkpoint_layers(model, 1)
    batch = pack(examples(), pad_id=0, device="cpu")
    eager = loss_and_grads(model, batch)
    trainers.compile_attention_and_mlp(model)
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
    copied = trainers.repeat_key_heads(reference_varlen_attn)(query, key, value, bounds, bounds, 6, 6,
                                                            enable_gqa=True, is_causal=True)
    assert torch.allclose(native, copied, atol=1e-6)


def bench_args(*extra):
    return speed.parse_args(["unused.json", "--steps", "2", "--warmup", "1", "--batch", "2",
                             "--seq-len", "16", *extra])


def test_peers_that_cannot_run_here_are_recorded_with_the_reason(tiny_model_dir):
    """On a CPU, Liger's and Unsloth's Triton kernels cannot run: each is skipped with a reason
    the results file keeps, and the plain script still trains."""
    from peers import PEERS

    args = bench_args()
    batches_of = {"fixed": workloads.fixed_batches(97, 2, 16, device="cpu")}
    results = {name: speed.measure_peer(PEERS[name], tiny_model_dir, "none", batches_of, args,
                                        device="cpu") for name in ("plain", "liger", "unsloth")}
    assert set(results["plain"]) == {"fixed"}
    assert all(torch.isfinite(torch.tensor(results["plain"]["fixed"]["losses"])))
    skipped = {s["peer"]: s["reason"] for s in speed.skipped_peers("v2", results)}
    assert set(skipped) == {"liger", "unsloth"}
    assert "CUDA GPU" in skipped["liger"]
    assert "unsloth" in skipped["unsloth"]  # not installed here, or needs a GPU


def test_a_peer_that_fails_is_recorded_with_its_error(tiny_model_dir):
    from peers import PEERS

    def load_fails(*args):
        raise RuntimeError("Unsloth: no kernel for this GPU")

    broken = replace(PEERS["plain"], name="broken", load=load_fails)
    batches_of = {"fixed": workloads.fixed_batches(97, 2, 16, device="cpu")}
    result = speed.measure_peer(broken, tiny_model_dir, "none", batches_of, bench_args(), device="cpu")
    assert result == {"skipped": "failed: RuntimeError: Unsloth: no kernel for this GPU"}


def test_unsloth_is_set_up_with_the_bench_lora_and_its_own_checkpointing():
    from peers import unsloth_arguments

    load, lora = unsloth_arguments("/models/x", "nf4", 1024)
    assert load["load_in_4bit"] and not load["load_in_16bit"] and load["dtype"] == torch.bfloat16
    assert load["model_name"] == "/models/x" and load["max_seq_length"] == 1024
    assert not unsloth_arguments("/models/x", "none", 1024)[0]["load_in_4bit"]
    assert (lora["r"], lora["lora_alpha"], lora["lora_dropout"]) == (1, 2, 0.0)
    assert sorted(lora["target_modules"]) == sorted(trainers.TARGETS) and len(trainers.TARGETS) == 7
    assert lora["use_gradient_checkpointing"] == "unsloth"


def test_every_peer_is_compared_with_the_trainer_within_its_peak_memory(tiny_model_dir):
    """The rows: one per workload and peer that ran, against the trainer run with the largest
    memory budget within that peer's peak, speed-ups from median step times."""
    from peers import PEERS

    args = bench_args("--no-ablations")
    batches_of = {"fixed": workloads.fixed_batches(97, 2, 16, device="cpu")}
    peer_results = {"plain": speed.measure_peer(PEERS["plain"], tiny_model_dir, "none", batches_of,
                                                args, device="cpu")}
    runs, ablations = speed.run_trainer(tiny_model_dir, "none", batches_of, {}, {}, args, device="cpu")
    assert ablations == [] and set(runs["fixed"]) == {"None"}  # no budget: memory not limited
    [row] = speed.comparison_rows("v2", args, peer_results, runs, peak_tflops=1.0)
    plain, ours = peer_results["plain"]["fixed"], runs["fixed"]["None"]
    assert row["peer"] == "plain" and row["workload"] == "fixed"
    assert row["speedup_vs_peer"] == pytest.approx(plain["s_per_step"] / ours["s_per_step"])
    assert row["within_peer_memory"] is None and row["goal_met"] is None  # no GPU peak on a CPU

    # on a GPU: budgets from the peers' peaks; each peer gets the run within its own peak
    gpu_runs = {"4.0": {"peak_gb": 3.9}, "6.0": {"peak_gb": 5.8}}
    assert speed.trainer_run_for(6.5, gpu_runs) is gpu_runs["6.0"]
    assert speed.trainer_run_for(4.0, gpu_runs) is gpu_runs["4.0"]
    assert speed.trainer_run_for(3.0, gpu_runs) is gpu_runs["4.0"]  # none within: the smallest
    peaks = {"liger": {"fixed": {"peak_gb": 6.0}}, "unsloth": {"skipped": "no GPU"},
             "plain": {"fixed": {"peak_gb": 9.0}}}
    assert speed.trainer_budgets(peaks, ["liger", "unsloth"]) == {"fixed": [6.0]}
    assert speed.trainer_budgets({"liger": {"fixed": {"peak_gb": 9.9028}}}, ["liger"]) == {"fixed": [9.902]}


def test_tokens_per_s_is_robust_to_one_slow_step(monkeypatch):
    """Median step time: one step 4x slower than the rest (seen on a GPU) does not move it."""
    from step import StepResult

    seconds = iter([1.0, 1.0, 4.0, 1.0, 1.0])
    monkeypatch.setattr(speed, "train_step", lambda *a, **k: StepResult(1.0, 0.5, 1e-4, 1.0,
                                                                         next(seconds), 100))
    model = torch.nn.Linear(2, 2)
    model.config = AutoConfig.for_model("llama", num_hidden_layers=1, hidden_size=8,
                                        num_attention_heads=2)
    batch = {"input_ids": torch.zeros(1, 100, dtype=torch.long)}
    result = speed.measure(model, None, [batch], steps=4, warmup=1)
    assert result["tokens_per_s"] == pytest.approx(100.0)
    assert result["mean_tokens_per_s"] == pytest.approx(400 / 7)


def test_memory_at_peak_replays_the_allocator_record_to_its_highest_point():
    """bench/memory_at_peak.py: the blocks live when the allocations peaked, summed by the first
    frames outside torch's module plumbing; a block freed before the peak is not among them."""
    def frames(*names):
        return [{"filename": f"/site-packages/{file}", "line": line, "name": name}
                for file, line, name in names]
    mlp = frames(("torch/nn/modules/module.py", 1, "_call_impl"), ("modeling_qwen3.py", 82, "forward"))
    attention = frames(("modeling_qwen3.py", 250, "forward"))
    trace = [
        {"action": "alloc", "addr": 1, "size": 80, "frames": mlp},
        {"action": "alloc", "addr": 2, "size": 30, "frames": attention},
        {"action": "free_completed", "addr": 2},
        {"action": "alloc", "addr": 3, "size": 80, "frames": mlp},
        {"action": "alloc", "addr": 4, "size": 10, "frames": attention},  # the peak: 170
        {"action": "free_requested", "addr": 1},  # still held until free_completed
        {"action": "free_completed", "addr": 1},
        {"action": "alloc", "addr": 5, "size": 50, "frames": attention},  # 140: below the peak
    ]
    peak, live = memory_at_peak.live_at_peak(trace)
    assert peak == 170 and sorted(live) == [1, 3, 4]
    assert memory_at_peak.by_site(live) == [("modeling_qwen3.py:82 forward", [160, 2]),
                                            ("modeling_qwen3.py:250 forward", [10, 1])]
