"""The trainer's speed features, each behind a `training:` option and measured in bench/speed.py.

- fused_kernels: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, and its fused linear
  cross-entropy, which computes the loss chunk by chunk from the last hidden states and never
  holds the batch x length x vocabulary logits.
- gradient_checkpointing: auto: recompute only as much as the memory budget requires, measured
  on the run's largest batch before training: compiled layers recompute their cheapest
  activations (plan_activation_memory), uncompiled ones whole layers (plan_checkpointing).
- packing (see train.pack): on CUDA, attention over the packed conversations runs as
  variable-length flash attention, which computes no score between two conversations; `auto`
  packs on a GPU only (use_packing).
- compile: torch.compile of each decoder layer, LoRA included: fewer kernels and far less Python
  per step (the uncompiled trainer leaves the GPU waiting for the CPU). Under a memory budget it
  recomputes the cheapest activations in backward rather than whole layers.
- mixed precision: LoRA weights stay float32 for the optimizer; on CUDA their matmuls run in
  bf16 under autocast, without the float32 copy of every adapter input that peft makes otherwise.

Also the numbers behind MFU: matmul FLOPs per token, attention FLOPs per sequence and the
card's measured bf16 matmul rate.
"""

import contextlib
import importlib.util
import inspect
import logging
import math
import time

import torch

from chat_format import IGNORE_INDEX
from errors import LoranotesError

log = logging.getLogger("loranotes.train")

# Architectures whose logits are exactly lm_head(last hidden state): no softcapping or scaling,
# so the fused loss equals the plain one. Liger patches their norms, MLP and RoPE.
FUSED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
VARLEN_ATTENTION = "loranotes_varlen"


class SpeedupError(LoranotesError):
    """A speed option that this machine or model cannot honour."""


# --- fused kernels (Liger) -----------------------------------------------------------------------

def use_fused_kernels(setting, model_type, device):
    """Whether to run Liger's kernels: `auto` takes them where they work (CUDA, a supported
    architecture, liger-kernel installed); `liger` insists; `none` never."""
    if setting == "none":
        return False
    problem = None
    if device.type != "cuda":
        problem = "they are Triton kernels and need a CUDA GPU"
    elif model_type not in FUSED_MODEL_TYPES:
        problem = f"model type {model_type!r} is not one of {sorted(FUSED_MODEL_TYPES)}"
    elif importlib.util.find_spec("liger_kernel") is None:
        problem = "liger-kernel is not installed (`pip install liger-kernel`)"
    if problem and setting == "liger":
        raise SpeedupError(f"training.fused_kernels is 'liger', but {problem}; set it to auto or none")
    if problem:
        log.info("fused kernels off: %s", problem)
    return problem is None


def apply_fused_kernels(model):
    """Swap this model's RMSNorm, SwiGLU MLP and RoPE for Liger's kernels (the loss is fused
    separately, in fused_token_loss_sums). Call before attaching LoRA.

    Liger patches transformers' modeling module itself (RoPE is a module-level function), so
    every model of this architecture built later in the process gets the kernels too: the
    pipeline trains each variant in a process of its own.
    """
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(
        model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
        fused_linear_cross_entropy=False,
    )


def compile_decoder_layers(model):
    """torch.compile each decoder layer whole, LoRA included: norms, attention, MLP and residual
    adds become one graph of fused kernels with far less Python per step, and one graph in which
    torch.compile can recompute cheap activations in backward instead of keeping them
    (set_activation_memory_kept). The layers share that graph. The checkpointing wrapper
    (transformers' GradientCheckpointingLayer.__call__) stays outside it, so checkpointing
    still applies per layer."""
    import torch._dynamo

    # A model torch.compile cannot trace runs uncompiled, with a warning, rather than failing.
    torch._dynamo.config.suppress_errors = True
    for layer in decoder_layers(model):
        layer.compile(dynamic=None)


def can_fuse_loss(model):
    """Whether the output layer is a plain linear map the fused loss can read. With LoRA on
    lm_head (lora.target_modules) it is not: the fused loss would skip the adapter."""
    head = model.get_base_model().get_output_embeddings()
    return type(head) is torch.nn.Linear


def fused_token_loss_sums(model, inputs, labels):
    """token_loss_sums without logits: the decoder's last hidden states go through Liger's fused
    linear cross-entropy, chunk by chunk, with the gradient computed in the forward pass."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    causal_lm = model.get_base_model()  # the transformers model inside peft
    decoder = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = decoder(**inputs).last_hidden_state
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    loss_fn = LigerFusedLinearCrossEntropyLoss(
        ignore_index=IGNORE_INDEX, reduction="sum", return_predicted_tokens=True
    )
    head = causal_lm.get_output_embeddings().weight
    out = loss_fn(head, hidden.view(-1, hidden.size(-1)), targets.view(-1))
    mask = targets != IGNORE_INDEX
    correct = ((out.predicted_tokens.view_as(targets) == targets) & mask).sum()
    return out.loss, correct, mask.sum()


# --- mixed precision -----------------------------------------------------------------------------

def keep_adapter_inputs_bf16(model):
    """Stop peft from casting each adapter's input to the adapter's dtype (float32): on a bf16
    model that is a float32 copy of the input of every one of the 7 projections in every layer,
    kept for backward. lora_mixed_precision casts the (tiny) adapter weights instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def lora_mixed_precision(device):
    """float32 LoRA weights for the optimizer, bf16 LoRA matmuls: autocast on CUDA."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


# --- gradient checkpointing policy ---------------------------------------------------------------

def decoder_layers(model):
    """The model's decoder layers, the units that gradient checkpointing recomputes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def enable_checkpointing(model):
    # Non-reentrant checkpointing needs no requires_grad on the inputs and allows checkpointing
    # some layers and not others.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name from transformers 5.2x on
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_layers(model, count):
    """Checkpoint the first `count` decoder layers, keep the activations of the others."""
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return len(layers)


def layers_to_checkpoint(layer_count, peak_all_gb, extra_per_layer_gb, budget_gb):
    """Fewest checkpointed layers whose predicted peak fits the budget.

    Peak memory grows linearly with the number of layers that keep their activations: from
    `peak_all_gb` (all checkpointed) by `extra_per_layer_gb` per layer kept.
    """
    if extra_per_layer_gb <= 0:
        return 0
    kept = math.floor((budget_gb - peak_all_gb) / extra_per_layer_gb)
    return layer_count - min(layer_count, max(0, kept))


def plan_checkpointing(model, step_peak_gb, budget_gb, probe_layers=4):
    """Checkpoint only as many decoder layers as `budget_gb` requires; returns how many.

    `step_peak_gb()` runs one forward and backward on the run's largest batch and returns the
    peak memory it allocated. Two such probes (all layers checkpointed, then `probe_layers`
    fewer) give the memory per kept layer; a third checks the chosen split, and each layer that
    still overshoots is checkpointed again.
    """
    layer_count = checkpoint_layers(model, len(decoder_layers(model)))
    peak_all = step_peak_gb()
    if peak_all > budget_gb:
        _warn_over_budget(peak_all, budget_gb)
        return layer_count
    probe = min(probe_layers, layer_count)
    checkpoint_layers(model, layer_count - probe)
    try:
        extra = (step_peak_gb() - peak_all) / probe
    except torch.cuda.OutOfMemoryError:
        checkpoint_layers(model, layer_count)
        return layer_count
    count = layers_to_checkpoint(layer_count, peak_all, extra, budget_gb)
    while count < layer_count:
        checkpoint_layers(model, count)
        if _peak_or_inf(step_peak_gb) <= budget_gb:
            break
        count += 1
    checkpoint_layers(model, count)
    log.info("gradient checkpointing: %d of %d layers (%.2f GB with all, %.3f GB per layer kept, "
             "budget %.2f GB)", count, layer_count, peak_all, extra, budget_gb)
    return count


def set_activation_memory_kept(fraction):
    """How much of a compiled layer's activations backward reads from memory, from 0 to 1:
    torch.compile's partitioner recomputes the rest in backward, the fewest FLOPs per byte saved
    first (pointwise ops and norms before matmuls): torch._functorch's activation_memory_budget.
    It is read when a graph compiles, so the compiled layers are dropped here and compile again on
    their next call. Process-wide: the pipeline trains each variant in a process of its own."""
    import torch._dynamo
    import torch._functorch.config

    torch._functorch.config.activation_memory_budget = fraction
    torch._dynamo.reset()


def plan_activation_memory(model, step_peak_gb, budget_gb, tries=3):
    """For compiled layers: keep as much of their activations as `budget_gb` allows and let
    torch.compile recompute the rest. Returns (checkpointed layers, fraction kept).

    `step_peak_gb()` runs one forward and backward on the run's largest batch and returns its
    peak memory. Probes: everything kept; every layer checkpointed (the least memory: each layer
    keeps only its input); then a fraction interpolated between the two, which is checked and
    lowered while it overshoots. Each new fraction costs one compilation. Recomputing within a
    layer beats checkpointing whole layers: the cheap ops go first, and the large matmuls only
    as far as the budget needs.
    """
    layer_count = checkpoint_layers(model, 0)
    set_activation_memory_kept(1.0)
    peak_all_kept = _peak_or_inf(step_peak_gb)
    if peak_all_kept <= budget_gb:
        log.info("activation memory: all kept (%.2f GB, budget %.2f GB)", peak_all_kept, budget_gb)
        return 0, 1.0
    checkpoint_layers(model, layer_count)
    peak_least = step_peak_gb()  # out of memory here: the caller says what to change
    if peak_least > budget_gb:
        _warn_over_budget(peak_least, budget_gb)
        return layer_count, 1.0
    checkpoint_layers(model, 0)
    # Memory grows about linearly with the fraction kept: aim between the two probes.
    fraction = 0.5 if math.isinf(peak_all_kept) else (budget_gb - peak_least) / (peak_all_kept - peak_least)
    for _ in range(tries):
        fraction = math.floor(fraction * 100) / 100
        if fraction <= 0:
            break
        set_activation_memory_kept(fraction)
        peak = _peak_or_inf(step_peak_gb)
        if peak <= budget_gb:
            log.info("activation memory: %.0f%% kept, the rest recomputed (%.2f GB; %.2f GB with "
                     "all kept, %.2f GB with every layer checkpointed; budget %.2f GB)",
                     100 * fraction, peak, peak_all_kept, peak_least, budget_gb)
            return 0, fraction
        fraction = fraction / 2 if math.isinf(peak) else 0.95 * fraction * (budget_gb - peak_least) / (peak - peak_least)
    set_activation_memory_kept(1.0)  # every layer checkpointed, measured to fit
    checkpoint_layers(model, layer_count)
    log.info("activation memory: every layer checkpointed (%.2f GB, budget %.2f GB)", peak_least, budget_gb)
    return layer_count, 1.0


def _peak_or_inf(step_peak_gb):
    """A probe's peak; a probe that runs out of memory is simply over any budget."""
    try:
        return step_peak_gb()
    except torch.cuda.OutOfMemoryError:
        return math.inf


def _warn_over_budget(peak_gb, budget_gb):
    log.warning("even with every layer checkpointed a step peaks at %.2f GB, over the "
                "%.2f GB budget (training.memory_budget_gb)", peak_gb, budget_gb)


def default_memory_budget_gb(device):
    """What this process holds plus 90% of what is free on the card: the rest is left to the
    allocator's fragmentation, the CUDA context's growth and other processes."""
    free, _ = torch.cuda.mem_get_info(device)
    return (torch.cuda.memory_allocated(device) + 0.9 * free) / 1e9


# --- variable-length attention for packed batches -----------------------------------------------

def use_packing(setting, device, batch_tokens=None):
    """Whether batches are packed: true/false as set; auto packs on a GPU, where the packed
    conversations get variable-length flash attention and no compute goes to padding. On a CPU
    auto pads, unless batch_tokens is set (a token budget counts real tokens, so it needs packed
    batches): packed attention there is SDPA with a block-diagonal mask over one long row, and
    packed steps of the embedded default took 1.3-1.6x as long as padded ones
    (bench/cpu_packing.py, bench/results/)."""
    if setting != "auto":
        return setting
    return device.type == "cuda" or bool(batch_tokens)


def varlen_attention_available(device):
    """torch >= 2.10 and a GPU its flash kernels run on (compute capability 8.0 or later)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def use_varlen_attention(model):
    """Route this model's attention through varlen_attention (packed batches get flash
    attention per conversation; other batches the usual SDPA)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    model.set_attn_implementation(VARLEN_ATTENTION)


def packed_sequence_bounds(lengths, device):
    """What variable-length attention needs for conversations of `lengths` packed in one row:
    cumulative offsets (int32, on the device) and the longest length."""
    offsets = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    # transformers' names for these (its flash-attention kwargs); other attention ignores them
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: flash attention per packed conversation when the batch
    carries `cu_seq_lens_q` (train.pack), SDPA with the mask otherwise (padded batches, eval)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    # Sliding windows, logit soft-capping, attention sinks and attention dropout are not
    # implemented here: SDPA with transformers' packed mask handles them.
    unsupported = dropout or any(kwargs.get(key) for key in ("sliding_window", "softcap", "s_aux"))
    if bounds is None or unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    from torch.nn.attention.varlen import varlen_attn

    # (1, heads, tokens, dim) -> (tokens, heads, dim)
    query, key, value = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    max_length = kwargs["max_length_q"]
    out = varlen_attn(query, key, value, bounds, bounds, max_length, max_length,
                      scale=scaling, **_VARLEN_OPTIONS)
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), no attention weights


def _varlen_options():
    """Causal masking: torch 2.10/2.11 take is_causal=True, later versions a window of (-1, 0).
    Grouped-query attention (fewer key than query heads): the flash kernel reads each key head
    for its group of query heads, no copies; later versions ask for enable_gqa, 2.11 takes it
    as is (checked against copied key heads on an H100, bench/results)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return {}
    parameters = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    if "enable_gqa" in parameters:
        options["enable_gqa"] = True
    return options


_VARLEN_OPTIONS = _varlen_options()


# --- MFU -----------------------------------------------------------------------------------------

def flops_per_token(model):
    """4 x the parameters of the model's matmuls (lm_head included, embeddings and LoRA not):
    2N forward and 2N for the input gradients in backward. Frozen weights get no weight
    gradient, recomputation is not useful work; attention is counted by attention_flops."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            total += module.in_features * module.out_features  # 4-bit weights are packed
    return 4 * total


def attention_flops(config, lengths):
    """Causal attention's FLOPs, forward and backward, for sequences of `lengths` tokens (not in
    flops_per_token: they grow with the length). Per layer and sequence of L tokens, with
    d = heads x head dim: Q K^T and P V take L^2 d each over the causal half, backward twice
    the forward, so 6 L^2 d. Recomputation inside the kernel is not counted."""
    width = config.num_attention_heads * (getattr(config, "head_dim", None)
                                          or config.hidden_size // config.num_attention_heads)
    return 6 * config.num_hidden_layers * width * sum(length * length for length in lengths)


def bf16_matmul_tflops(device, size=8192, repeats=10):
    """The card's bf16 matmul rate, measured: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12
