"""The trainer's speed options keep training the same: partial gradient checkpointing gives the
same gradients, the checkpointing policy fits the memory budget with as few recomputed layers
as it can, packed variable-length attention equals padded batches, and options that cannot run
here say so."""

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from chat_format import IGNORE_INDEX
from batches import collate, pack
from memory_plan import (
    checkpoint_layers,
    decoder_layers,
    enable_checkpointing,
    layers_to_checkpoint,
    layer_inputs_offloaded,
    offload_layer_inputs,
    plan_activation_memory,
    plan_checkpointing,
)
from run_metrics import attention_flops, flops_per_token
from speedups import (
    SpeedupError,
    TrainerOptions,
    attach_lora,
    use_fused_kernels,
    use_packing,
    use_varlen_attention,
)
from step import StepOptions, forward_backward

LORA = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def tiny_model(layers=4, kv_heads=2):
    config = AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def examples(lengths=(7, 12, 4, 9)):
    generator = torch.Generator().manual_seed(1)
    result = []
    for length in lengths:
        ids = torch.randint(0, 97, (length,), generator=generator).tolist()
        result.append((ids, [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]))
    return result


def result_and_grads(model, batch, options=StepOptions()):
    """forward_backward's MicroBatch for `batch` and the LoRA gradients it left."""
    model.zero_grad(set_to_none=True)
    result = forward_backward(model, batch, options)
    return result, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def loss_and_grads(model, batch):
    result, grads = result_and_grads(model, batch)
    return result.loss, grads


def assert_same(first, second, tolerance=1e-5):
    assert abs(first[0] - second[0]) < tolerance
    for a, b in zip(first[1], second[1]):
        assert torch.allclose(a, b, atol=tolerance)


def test_checkpointing_some_layers_gives_the_gradients_of_none_and_all():
    model = attach_lora(tiny_model(), LORA, gradient_checkpointing=True)
    model.train()
    batch = collate(examples(), pad_id=0, device="cpu")
    results = {}
    for count in (0, 2, 4):
        assert checkpoint_layers(model, count) == 4
        flags = [layer.gradient_checkpointing for layer in decoder_layers(model)]
        assert flags == [True] * count + [False] * (4 - count)
        results[count] = loss_and_grads(model, batch)
    assert_same(results[2], results[0])
    assert_same(results[4], results[0])


@pytest.mark.parametrize(
    "peak_all, per_layer, budget, expected",
    [
        (10.0, 1.0, 42.5, 0),    # everything fits: nothing recomputed
        (10.0, 1.0, 40.0, 2),    # 30 layers keep activations
        (10.0, 1.0, 10.0, 32),   # only full checkpointing fits
        (10.0, 1.0, 9.0, 32),    # not even that: still all, the run warns
        (10.0, 1.0, 20.5, 22),   # 10 layers keep activations, 22 are recomputed
        (10.0, 0.0, 11.0, 0),    # activations cost nothing measurable
    ],
)
def test_layers_to_checkpoint_is_the_fewest_that_fit(peak_all, per_layer, budget, expected):
    assert layers_to_checkpoint(32, peak_all, per_layer, budget) == expected


def fake_peaks(model, base_gb, per_layer_gb, misestimate_gb=0.0):
    """A step's peak as plan_checkpointing would measure it: linear in the layers not
    checkpointed, plus a surprise once more than 4 layers keep their activations."""
    def step_peak_gb():
        kept = sum(not layer.gradient_checkpointing for layer in decoder_layers(model))
        return base_gb + per_layer_gb * kept + (misestimate_gb if kept > 4 else 0.0)
    return step_peak_gb


def test_checkpointing_policy_recomputes_only_what_the_budget_needs(caplog):
    model = attach_lora(tiny_model(layers=12), LORA, gradient_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="loranotes.train"):
        count = plan_checkpointing(model, fake_peaks(model, 8.0, 0.5), budget_gb=11.2)
    assert count == 6  # 6 layers x 0.5 GB kept on top of 8 GB fits 11.2; 7 would not
    assert sum(layer.gradient_checkpointing for layer in decoder_layers(model)) == 6
    assert "6 of 12 layers" in caplog.text


def test_checkpointing_policy_checks_its_choice_and_backs_off():
    model = attach_lora(tiny_model(layers=12), LORA, gradient_checkpointing=True)
    # the linear estimate says 6 layers fit; the real peak is 0.8 GB higher beyond 4 kept layers
    count = plan_checkpointing(model, fake_peaks(model, 8.0, 0.5, misestimate_gb=0.8), budget_gb=11.2)
    kept = 12 - count
    assert 8.0 + 0.5 * kept + (0.8 if kept > 4 else 0) <= 11.2
    assert count == 8  # 4 kept: the most that fit


def test_checkpointing_policy_over_budget_checkpoints_everything(caplog):
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    with caplog.at_level(logging.WARNING, logger="loranotes.train"):
        assert plan_checkpointing(model, fake_peaks(model, 8.0, 0.5), budget_gb=7.0) == 4
    assert "memory_budget_gb" in caplog.text


def fake_compiled_peaks(model, least_gb, all_kept_gb, curve=lambda fraction: fraction, oom_above_gb=None):
    """A step's peak as plan_activation_memory would measure it on compiled layers: `least_gb`
    with every layer checkpointed; otherwise between that and `all_kept_gb` as `curve` of the
    fraction kept (torch.compile's activation_memory_budget, read where a graph compiles)."""
    import torch._functorch.config

    compiles = []

    def step_peak_gb():
        if all(layer.gradient_checkpointing for layer in decoder_layers(model)):
            return least_gb
        fraction = torch._functorch.config.activation_memory_budget
        compiles.append(fraction)
        peak = least_gb + curve(fraction) * (all_kept_gb - least_gb)
        if oom_above_gb is not None and peak > oom_above_gb:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return peak

    step_peak_gb.compiles = compiles
    return step_peak_gb


@pytest.fixture
def activation_budget():
    """plan_activation_memory sets torch's process-wide activation_memory_budget: restore it."""
    import torch._functorch.config

    yield
    torch._functorch.config.activation_memory_budget = 1.0


def test_activation_plan_keeps_everything_when_it_fits(activation_budget):
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    peaks = fake_compiled_peaks(model, least_gb=9.0, all_kept_gb=26.0)
    assert plan_activation_memory(model, peaks, budget_gb=30.0) == (0, 1.0)
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert peaks.compiles == [1.0]  # one probe, nothing recompiled


def test_activation_plan_keeps_as_much_as_the_budget_allows(activation_budget, caplog):
    """The Qwen3-4B bf16 case at 4 x 1024 on an H100: 26.6 GB with every activation kept, a
    16.4 GB budget. No layer is checkpointed; torch.compile recomputes the rest."""
    import torch._functorch.config

    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    peaks = fake_compiled_peaks(model, least_gb=9.0, all_kept_gb=26.6)
    with caplog.at_level(logging.INFO, logger="loranotes.train"):
        layers, kept = plan_activation_memory(model, peaks, budget_gb=16.4)
    assert layers == 0 and not any(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert 9.0 + kept * 17.6 <= 16.4 < 9.0 + (kept + 0.02) * 17.6  # within 2% of the most that fits
    assert torch._functorch.config.activation_memory_budget == kept  # what the run compiles with
    assert peaks.compiles == [1.0, kept]  # the interpolated fraction fit at once
    assert "42% kept" in caplog.text


def test_activation_plan_checks_its_choice_and_lowers_it(activation_budget):
    """Memory that is not linear in the fraction kept: the first guess overshoots."""
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    peaks = fake_compiled_peaks(model, least_gb=9.0, all_kept_gb=26.6, curve=lambda f: f ** 0.8)
    layers, kept = plan_activation_memory(model, peaks, budget_gb=16.4)
    assert layers == 0 and 9.0 + kept ** 0.8 * 17.6 <= 16.4
    assert len(peaks.compiles) <= 4 and peaks.compiles[-1] == kept


def test_activation_plan_survives_running_out_of_memory(activation_budget):
    """Keeping everything does not fit on the card at all (out of memory): guess, then aim."""
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    peaks = fake_compiled_peaks(model, least_gb=9.0, all_kept_gb=60.0, oom_above_gb=40.0)
    layers, kept = plan_activation_memory(model, peaks, budget_gb=16.4)
    assert layers == 0 and 9.0 + kept * 51.0 <= 16.4 and kept > 0


def test_activation_plan_falls_back_to_checkpointing_every_layer(activation_budget, caplog):
    import torch._functorch.config

    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    # nothing between "every layer checkpointed" and "all kept" fits
    peaks = fake_compiled_peaks(model, least_gb=9.0, all_kept_gb=26.6, curve=lambda f: 1.0)
    assert plan_activation_memory(model, peaks, budget_gb=16.4) == (4, 1.0)
    assert all(layer.gradient_checkpointing for layer in decoder_layers(model))
    assert torch._functorch.config.activation_memory_budget == 1.0
    # and when even that (inputs offloaded) is over the budget, the run is told; recomputing more
    # inside the layers that lowers no peak is not chosen
    with caplog.at_level(logging.WARNING, logger="loranotes.train"):
        assert plan_activation_memory(model, fake_compiled_peaks(model, 18.0, 30.0), budget_gb=16.4) == (4, 1.0)
    assert "memory_budget_gb" in caplog.text
    assert torch._functorch.config.activation_memory_budget == 1.0
    # where it lowers the peak, the least memory is chosen
    assert plan_activation_memory(model, fake_offloaded_peaks(model, 9.76, 9.01), budget_gb=8.0) == (4, 0.0)
    assert torch._functorch.config.activation_memory_budget == 0.0


def fake_offloaded_peaks(model, checkpointed_gb, offloaded_gb, all_kept_gb=26.6):
    """Peaks with every layer checkpointed: `checkpointed_gb`, less with the inputs offloaded
    (`offloaded_gb` at 100% kept inside, 0.4 GB less at 50%, 0.8 GB less at none)."""
    import torch._functorch.config

    def step_peak_gb():
        if not all(layer.gradient_checkpointing for layer in decoder_layers(model)):
            return all_kept_gb
        if not layer_inputs_offloaded(model):
            return checkpointed_gb
        return offloaded_gb - 0.8 * (1 - torch._functorch.config.activation_memory_budget)
    return step_peak_gb


@pytest.mark.parametrize("budget, kept", [(9.1, 1.0), (8.7, 0.5), (8.3, 0.0)])
def test_activation_plan_offloads_layer_inputs_when_every_layer_checkpointed_is_over(
        activation_budget, caplog, budget, kept):
    """The Qwen3-4B bf16 case at 4 x 1024 on an H200 within Unsloth's 8.99 GB: every layer
    checkpointed peaks at 9.76 GB; with their inputs in CPU memory 0.75 GB less."""
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="loranotes.train"):
        plan = plan_activation_memory(model, fake_offloaded_peaks(model, 9.76, 9.01), budget_gb=budget)
    assert plan == (4, kept) and layer_inputs_offloaded(model)
    assert "inputs offloaded" in caplog.text and "WARNING" not in caplog.text


def test_checkpointing_policy_offloads_layer_inputs_when_every_layer_is_over(caplog):
    model = attach_lora(tiny_model(layers=4), LORA, gradient_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="loranotes.train"):
        assert plan_checkpointing(model, fake_offloaded_peaks(model, 9.76, 9.01), budget_gb=9.1) == 4
    assert layer_inputs_offloaded(model) and "inputs offloaded" in caplog.text
    # a budget that fits without offloading leaves the inputs on the GPU
    assert plan_checkpointing(model, fake_offloaded_peaks(model, 9.76, 9.01), budget_gb=9.8) == 4
    assert not layer_inputs_offloaded(model)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_offloaded_layer_inputs_give_the_gradients_of_plain_checkpointing(dropout):
    """Recomputing from the offloaded input replays the forward exactly, dropout masks
    included, and reaches the LoRA weights of every layer (the first layer's input, the frozen
    embedding's output, needs no gradient)."""
    model = attach_lora(tiny_model(), {**LORA, "dropout": dropout}, gradient_checkpointing=True)
    model.train()
    checkpoint_layers(model, 4)
    batch = collate(examples(), pad_id=0, device="cpu")
    torch.manual_seed(5)
    plain = loss_and_grads(model, batch)
    offload_layer_inputs(model, True)
    torch.manual_seed(5)
    offloaded = loss_and_grads(model, batch)
    assert_same(offloaded, plain)
    assert not [name for name, p in model.named_parameters()
                if "lora_B" in name and not p.grad.abs().sum() > 0]  # every layer's adapters learn


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=None,
                          enable_gqa=False, **causal):
    """torch's varlen_attn, spelled out: causal attention within each packed sequence."""
    assert causal in ({"is_causal": True}, {"window_size": (-1, 0)})
    # grouped-query attention: key heads are not copied, and this torch is told
    assert query.shape[1] == key.shape[1] or enable_gqa, "fewer key heads need enable_gqa"
    outputs = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        outputs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                      enable_gqa=enable_gqa).transpose(0, 1))
    assert max_q == max(b - a for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()))
    return torch.cat(outputs)


def counted(kernel, calls):
    """`kernel`, counting its calls in `calls`."""
    def counting_kernel(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)
    return counting_kernel


@pytest.mark.parametrize("kv_heads", [4, 2])  # multi-head and grouped-query attention
def test_packed_varlen_attention_equals_padded_batches(kv_heads):
    model = attach_lora(tiny_model(layers=2, kv_heads=kv_heads), LORA, gradient_checkpointing=False)
    model.train()
    padded = loss_and_grads(model, collate(examples(), pad_id=0, device="cpu"))
    calls = []
    use_varlen_attention(model, counted(reference_varlen_attn, calls))
    packed = loss_and_grads(model, pack(examples(), pad_id=0, device="cpu"))
    assert len(calls) == 2  # one per layer: the packed batch went through varlen attention
    assert_same(packed, padded)
    # padded batches (eval) still take SDPA with their padding mask
    assert_same(loss_and_grads(model, collate(examples(), pad_id=0, device="cpu")), padded)
    assert len(calls) == 2


def test_fused_kernels_say_why_they_cannot_run_here():
    cpu = torch.device("cpu")
    assert use_fused_kernels("auto", "llama", cpu) is False
    assert use_fused_kernels("none", "llama", cpu) is False
    with pytest.raises(SpeedupError, match="fused_kernels is 'liger'.*CUDA GPU.*auto or none"):
        use_fused_kernels("liger", "llama", cpu)


def test_flops_per_token_counts_the_matmuls_once():
    model = tiny_model(layers=2, kv_heads=2)
    # per layer: q, o 32x32; k, v 32x16 (2 of 4 heads); gate, up, down 32x64; lm_head 32x97
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64
    expected = 4 * (2 * per_layer + 32 * 97)
    assert flops_per_token(model) == expected
    enable_checkpointing(model)
    assert flops_per_token(attach_lora(model, LORA, gradient_checkpointing=True)) == expected


def lengths_of(batch):
    return [len(ids) for ids, _ in batch]


def test_token_budget_batches_hold_at_most_the_budget_in_order():
    from batches import token_budget_batches

    conversations = examples(lengths=(300, 500, 200, 900, 1200, 100, 100, 50))
    batches = list(token_budget_batches(conversations, 1000))
    assert [lengths_of(b) for b in batches] == [[300, 500, 200], [900], [1200], [100, 100, 50]]
    # nothing lost or reordered; only a conversation longer than the budget goes over it
    assert [c for b in batches for c in b] == conversations
    assert all(sum(lengths_of(b)) <= 1000 or len(b) == 1 for b in batches)


def test_token_budget_epochs_cover_the_split_and_depend_only_on_the_seed():
    from batches import batches_forever

    conversations = examples(lengths=[20 + 7 * i % 90 for i in range(40)])
    run = batches_forever(conversations, batch_size=4, seed=3, batch_tokens=200)
    again = batches_forever(conversations, batch_size=4, seed=3, batch_tokens=200)
    first = [next(run) for _ in range(30)]
    assert first == [next(again) for _ in range(30)]
    assert all(sum(lengths_of(batch)) <= 200 for batch in first)
    # each epoch sees every conversation once, but for its dropped leftovers
    epoch, seen = [], set()
    for batch in first:
        ids = [tuple(ids) for ids, _ in batch]
        if seen & set(ids):
            break
        seen |= set(ids)
        epoch.append(batch)
    leftover = len(conversations) - len(seen)
    assert 0 <= leftover and sum(sorted(len(ids) for ids, _ in conversations)[:leftover]) < 200


def test_the_checkpointing_probe_gets_the_largest_batch_a_run_can_see():
    from batches import largest_batch

    conversations = examples(lengths=(300, 500, 200, 900, 1200, 100))
    by_count = largest_batch(conversations, {"batch_size": 2, "batch_tokens": None})
    assert lengths_of(by_count) == [1200, 900]
    by_tokens = largest_batch(conversations, {"batch_size": 2, "batch_tokens": 1500})
    assert lengths_of(by_tokens) == [1200, 300]  # 900 would go over 1500; 300 still fits
    by_tokens = largest_batch(conversations, {"batch_size": 2, "batch_tokens": 1400})
    assert lengths_of(by_tokens) == [1200, 200]  # topped up to the budget with a cut 900
    # no batch the run can draw holds more tokens than the probe
    from batches import token_budget_batches
    for budget in (1300, 1400, 1500, 2500):
        probe = sum(lengths_of(largest_batch(conversations, {"batch_size": 2, "batch_tokens": budget})))
        assert probe == budget
        for seed in range(20):
            order = torch.randperm(len(conversations), generator=torch.Generator().manual_seed(seed))
            for batch in token_budget_batches([conversations[i] for i in order], budget):
                assert sum(lengths_of(batch)) <= probe


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo
    torch._dynamo.reset()


def test_compiled_layers_train_exactly_like_eager_ones(fresh_dynamo, monkeypatch):
    """training.compile on the CPU's compiler: LoRA, partial checkpointing and packed batches go
    through torch.compile whole (no graph breaks) and give the eager loss and gradients."""
    from speedups import compile_decoder_layers

    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=True)
    model.train()
    checkpoint_layers(model, 1)
    batches = [pack(examples(lengths), pad_id=0, device="cpu") for lengths in ((7, 12, 4, 9), (5, 3))]
    eager = [loss_and_grads(model, batch) for batch in batches]
    monkeypatch.setattr(fresh_dynamo.config, "suppress_errors", False)  # restored after the test
    compile_decoder_layers(model)
    # compile_decoder_layers lets a failed compilation fall back to eager; here it must fail
    monkeypatch.setattr(fresh_dynamo.config, "suppress_errors", False)
    compiled = [loss_and_grads(model, batch) for batch in batches]  # the second: a new shape
    for ours, reference in zip(compiled, eager):
        assert_same(ours, reference)
    assert fresh_dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    assert not fresh_dynamo.utils.counters["graph_break"]


def test_recomputation_inside_compiled_layers_gives_the_eager_gradients(fresh_dynamo, monkeypatch):
    """gradient_checkpointing: auto on compiled layers keeps part of their activations and has
    torch.compile recompute the rest in backward: the gradients stay the eager ones."""
    from memory_plan import set_activation_memory_kept
    from speedups import compile_decoder_layers

    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=True)
    model.train()
    checkpoint_layers(model, 0)
    batch = pack(examples(), pad_id=0, device="cpu")
    eager = loss_and_grads(model, batch)
    compile_decoder_layers(model)
    monkeypatch.setattr(fresh_dynamo.config, "suppress_errors", False)
    try:
        for fraction in (0.3, 0.0):
            set_activation_memory_kept(fraction)
            assert_same(loss_and_grads(model, batch), eager)
    finally:
        set_activation_memory_kept(1.0)
    assert not fresh_dynamo.utils.counters["graph_break"]


class ReferenceFusedLinearCrossEntropy:
    """Liger's fused linear cross-entropy, spelled out with logits (Triton needs a GPU)."""

    def __init__(self, ignore_index, reduction, return_predicted_tokens):
        assert reduction == "sum" and return_predicted_tokens
        self.ignore_index = ignore_index

    def __call__(self, weight, hidden, targets):
        from types import SimpleNamespace

        logits = (hidden @ weight.T).float()
        loss = F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction="sum")
        return SimpleNamespace(loss=loss, predicted_tokens=logits.argmax(-1))


@pytest.mark.parametrize("make_batch", [collate, pack])
def test_fused_loss_equals_the_plain_loss(monkeypatch, make_batch):
    import liger_kernel.transformers

    monkeypatch.setattr(liger_kernel.transformers, "LigerFusedLinearCrossEntropyLoss",
                        ReferenceFusedLinearCrossEntropy)
    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=False)
    model.train()
    batch = make_batch(examples(), pad_id=0, device="cpu")
    (plain, plain_grads), (fused, fused_grads) = (
        result_and_grads(model, batch, StepOptions(fused_loss=on)) for on in (False, True))
    assert fused[1:] == plain[1:]  # same correct predictions, targets, tokens
    assert_same((fused[0], fused_grads), (plain[0], plain_grads))


@pytest.mark.parametrize("make_batch", [collate, pack])
@pytest.mark.parametrize("lora_on_head", [False, True])
def test_logits_at_targets_only_give_the_full_logits_loss_and_gradients(make_batch, lora_on_head):
    """StepOptions.target_logits: the output layer only where a target follows (prompt and
    padding positions skipped) trains exactly like logits everywhere, LoRA on lm_head included."""
    lora = {**LORA, "target_modules": [*LORA["target_modules"], "lm_head"]} if lora_on_head else LORA
    model = attach_lora(tiny_model(layers=2), lora, gradient_checkpointing=False)
    model.train()
    batch = make_batch(examples(), pad_id=0, device="cpu")
    (full, full_grads), (targeted, targeted_grads) = (
        result_and_grads(model, batch, StepOptions(target_logits=on)) for on in (False, True))
    assert targeted[1:] == full[1:]  # same correct predictions, targets, tokens
    assert full[2] == sum(len(ids) - len(ids) // 2 for ids, _ in examples())  # the labelled ones
    assert_same((targeted[0], targeted_grads), (full[0], full_grads), tolerance=1e-6)


def test_eval_with_logits_at_targets_only_gives_the_same_figures():
    from step import evaluate

    model = attach_lora(tiny_model(layers=2), LORA, gradient_checkpointing=False)
    split = examples((7, 12, 4, 9, 3, 15, 8))
    full, targeted = (evaluate(model, split, 3, 0, torch.device("cpu"), target_logits=on)
                      for on in (False, True))
    assert (targeted.accuracy, targeted.target_tokens, targeted.conversations) == (
        full.accuracy, full.target_tokens, full.conversations)
    assert targeted.loss == pytest.approx(full.loss, abs=1e-6)
    assert targeted.loss_se == pytest.approx(full.loss_se, abs=1e-6)


def test_logits_at_targets_only_for_architectures_whose_logits_are_the_output_layer():
    from speedups import decide_speedups

    training = {"fused_kernels": "auto", "compile": True, "packing": "auto", "batch_tokens": None,
                "gradient_checkpointing": "auto"}
    cpu = torch.device("cpu")
    assert decide_speedups(training, "qwen3", cpu, varlen_available=False).target_logits
    # Gemma 2 softcaps its logits after the output layer: only the model's own forward has them
    assert not decide_speedups(training, "gemma2", cpu, varlen_available=False).target_logits
    off = TrainerOptions(target_logits=False)
    assert not decide_speedups(training, "qwen3", cpu, off, varlen_available=False).target_logits


def test_lora_on_lm_head_keeps_the_plain_loss():
    from step import can_fuse_loss

    assert can_fuse_loss(attach_lora(tiny_model(layers=1), LORA, gradient_checkpointing=False))
    with_head = {**LORA, "target_modules": [*LORA["target_modules"], "lm_head"]}
    assert not can_fuse_loss(attach_lora(tiny_model(layers=1), with_head, gradient_checkpointing=False))


def test_fused_kernels_only_for_architectures_they_cover():
    cuda = torch.device("cuda")  # use_fused_kernels only looks at the device's type
    assert use_fused_kernels("auto", "qwen3", cuda) is True
    assert use_fused_kernels("auto", "gemma3", cuda) is False
    with pytest.raises(SpeedupError, match="model type 'gemma3' is not one of"):
        use_fused_kernels("liger", "gemma3", cuda)


def test_sliding_window_attention_is_left_to_sdpa():
    """varlen_attention implements plain causal attention only: a model with a sliding window
    keeps transformers' packed SDPA path, and its loss."""
    calls = []
    config = AutoConfig.for_model(
        "mistral", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
    )
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config), LORA, gradient_checkpointing=False)
    model.train()
    padded = loss_and_grads(model, collate(examples(), pad_id=0, device="cpu"))
    use_varlen_attention(model, counted(reference_varlen_attn, calls))
    assert_same(loss_and_grads(model, pack(examples(), pad_id=0, device="cpu")), padded)
    assert not calls


def test_attention_flops_count_the_causal_half_forward_and_backward():
    """Qwen3-4B at 4 x 1024: 6 x 36 layers x (32 x 128) x 1024^2 per sequence, 0.9 GFLOP per
    token next to 16 GFLOP of matmuls. Grouped-query attention saves memory, not FLOPs."""
    from model_sources import KNOWN_ARCHITECTURES

    spec = dict(KNOWN_ARCHITECTURES["Qwen/Qwen3-4B"])
    config = AutoConfig.for_model(spec.pop("architecture"), **spec)
    assert attention_flops(config, [1024] * 4) == 4 * 6 * 36 * 4096 * 1024**2
    # packing: quadratic in each conversation's length, not in the row's
    assert attention_flops(config, [512, 512]) == attention_flops(config, [1024]) / 2


def test_mfu_counts_matmul_and_attention_flops_of_the_timed_steps():
    from run_metrics import WARMUP_STEPS_EXCLUDED, summarize

    steps = [{"step": i, "loss": 1.0, "token_accuracy": 0.5, "seconds": 0.5, "tokens": 4096,
              "conversations": 4, "attention_flops": 1e12} for i in range(WARMUP_STEPS_EXCLUDED + 4)]
    steps[0]["seconds"] = 30.0  # compilation: not timed
    evaluations = [{"step": step, "loss": loss, "accuracy": accuracy, "loss_se": 0.01,
                    "target_tokens": 900, "conversations": 10}
                   for step, loss, accuracy in ((0, 2.0, 0.1), (len(steps), 1.5, 0.2))]
    metrics = summarize(steps, evaluations, {}, {"flops_per_token": 16e9, "bf16_matmul_tflops": 800.0})
    assert metrics["mfu"] == pytest.approx((4096 * 16e9 + 1e12) / 0.5 / 800e12)


def test_packing_auto_packs_on_a_gpu_and_pads_on_a_cpu_unless_a_token_budget_needs_packing():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_packing("auto", cuda) and not use_packing("auto", cpu)
    assert use_packing("auto", cpu, batch_tokens=4096)  # a token budget counts real tokens
    assert use_packing(True, cpu) and not use_packing(False, cuda)  # set: as set
