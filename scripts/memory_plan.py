"""How much a run recomputes in backward to fit its memory budget (training.gradient_checkpointing,
training.memory_budget_gb), decided once before training and measured on the run's largest
batch; and what to say when a batch does not fit.

The policies, by name (speedups.Speedups.memory_policy says which one a run has):
- none: every activation kept (gradient_checkpointing false, or auto on a CPU, where no peak
  memory is measured);
- every layer: every decoder layer checkpointed (gradient_checkpointing true);
- whole layers: auto, uncompiled layers: as few whole layers checkpointed as the budget needs
  (plan_checkpointing);
- recompute in compiled layers: auto, compiled layers: they keep as much of their activations
  as the budget allows and torch.compile recomputes the cheapest rest (plan_activation_memory).

Where even every layer checkpointed is over the budget, the measured policies also move the
checkpointed layers' inputs to CPU memory until backward needs them (offload_layer_inputs), as
Unsloth's "unsloth" checkpointing does (0.75 GB of inputs for Qwen3-4B at 4 x 1024; its peak fell
from 9.76 to 9.40 GB on an H200); and then let the compiled layers recompute inside too.
"""

import logging
import math
from dataclasses import dataclass
from functools import partial

import torch

from step import TrainingError, forward_backward

log = logging.getLogger("loranotes.train")

NONE, EVERY_LAYER, WHOLE_LAYERS, RECOMPUTE = (
    "none", "every layer", "whole layers", "recompute in compiled layers")


@dataclass(frozen=True)
class MemoryPlan:
    """What the plan chose: checkpointed decoder layers, and the share of the compiled layers'
    activations they keep (the rest is recomputed in backward)."""
    gradient_checkpointing_layers: int
    decoder_layers: int
    activations_kept: float = 1.0
    layer_inputs_offloaded: bool = False  # the checkpointed layers' inputs wait in CPU memory

    @property
    def all_checkpointed(self):
        return self.gradient_checkpointing_layers == self.decoder_layers


def memory_policy(setting, cuda, compiled, recompute_in_compiled_layers=True):
    """The policy for training.gradient_checkpointing `setting` on this device."""
    if setting is True:
        return EVERY_LAYER
    if setting is False or not cuda:  # auto checkpoints nothing on a CPU
        return NONE
    return RECOMPUTE if compiled and recompute_in_compiled_layers else WHOLE_LAYERS


def plan_memory(model, policy, probe_batch, training, quantization, step_options):
    """Apply `policy` to the model. The measured policies keep a step of `probe_batch` (the
    run's largest) within training.memory_budget_gb (default_memory_budget_gb)."""
    layer_count = len(decoder_layers(model))
    if policy in (NONE, EVERY_LAYER):
        checkpointed = layer_count if policy == EVERY_LAYER else 0
        checkpoint_layers(model, checkpointed)
        return MemoryPlan(checkpointed, layer_count)
    device = probe_batch["input_ids"].device
    budget = training["memory_budget_gb"] or default_memory_budget_gb(device)

    def step_peak_gb():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            forward_backward(model, probe_batch, step_options)
        finally:  # a probe's gradients, even half-made ones, must not reach the first step
            model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated(device) / 1e9

    # The probes draw dropout masks; how many run depends on the card, the seeded run must not.
    with torch.random.fork_rng(devices=[device]):
        try:
            if policy == RECOMPUTE:
                layers, kept = plan_activation_memory(model, step_peak_gb, budget)
                return MemoryPlan(layers, layer_count, kept, layer_inputs_offloaded(model))
            layers = plan_checkpointing(model, step_peak_gb, budget)
            return MemoryPlan(layers, layer_count, layer_inputs_offloaded=layer_inputs_offloaded(model))
        except torch.cuda.OutOfMemoryError as error:
            raise out_of_memory("in a step of the run's largest batch, with every layer "
                                "checkpointed", probe_batch, training, quantization,
                                all_checkpointed=True) from error


def out_of_memory(where, batch, training, quantization, all_checkpointed):
    """The error for a batch that does not fit, with what to change in this run's settings."""
    advice = []
    if not all_checkpointed and training["gradient_checkpointing"] is False:
        advice.append("set training.gradient_checkpointing: auto (or true)")
    elif not all_checkpointed:  # auto measured a split that did not hold
        advice.append("lower training.memory_budget_gb (does another process share the GPU?)")
    size = "training.batch_tokens" if training["batch_tokens"] else "training.batch_size"
    advice.append(f"lower {size} or training.max_length")
    if quantization == "none":
        advice.append("use quantization: nf4")
    tokens = batch["input_ids"].numel()
    return TrainingError(f"out of GPU memory {where} ({tokens} tokens in the batch): "
                         + "; or ".join(advice))


# --- the mechanism: which decoder layers recompute ------------------------------------------------

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


def offload_layer_inputs(model, on):
    """Whether the checkpointed decoder layers keep their inputs in CPU memory (pinned) until
    backward recomputes them, instead of on the GPU."""
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        layer._gradient_checkpointing_func = (
            offloaded_checkpoint if on else partial(checkpoint, use_reentrant=False))


def layer_inputs_offloaded(model):
    return any(getattr(layer, "_gradient_checkpointing_func", None) is offloaded_checkpoint
               for layer in decoder_layers(model))


def offloaded_checkpoint(function, hidden_states, *args):
    """`function(hidden_states, *args)` checkpointed with `hidden_states` in CPU memory until
    backward: the signature of transformers' `_gradient_checkpointing_func`."""
    return _OffloadedCheckpoint.apply(function, _REQUIRES_GRAD, hidden_states, *args)


# Makes the checkpoint's output require grad even where its input does not (the first layer's
# input is the frozen embedding's output), so that backward reaches the LoRA weights inside.
_REQUIRES_GRAD = torch.empty(0, requires_grad=True)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of one layer whose input waits in pinned CPU memory: forward
    runs without keeping activations; backward copies the input back, reruns the layer under the
    same autocast and random state, and backpropagates through it."""

    @staticmethod
    def forward(ctx, function, _requires_grad, hidden_states, *args):
        ctx.function, ctx.args, ctx.device = function, args, hidden_states.device
        ctx.autocast = _autocast_state(hidden_states.device.type)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        ctx.offloaded = torch.empty(hidden_states.shape, dtype=hidden_states.dtype,
                                    pin_memory=ctx.device.type == "cuda")
        ctx.offloaded.copy_(hidden_states, non_blocking=True)
        with torch.no_grad():
            return function(hidden_states, *args)

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden_states = ctx.offloaded.to(ctx.device, non_blocking=True).requires_grad_()
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(ctx.device.type, **ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.function(hidden_states, *ctx.args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(output, grad) for output, grad in zip(outputs, grad_outputs)
                 if isinstance(output, torch.Tensor) and output.requires_grad and grad is not None]
        torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        grad_input = hidden_states.grad if ctx.needs_input_grad[2] else None
        return (None, None, grad_input, *(None for _ in ctx.args))


def _autocast_state(device_type):
    return {"enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


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


# --- the measured policies -----------------------------------------------------------------------

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
    offload_layer_inputs(model, False)
    peak_all = step_peak_gb()
    if peak_all > budget_gb:
        offload_layer_inputs(model, True)
        peak = step_peak_gb()
        if peak > budget_gb:
            _warn_over_budget(peak, budget_gb)
        log.info("gradient checkpointing: every layer, inputs offloaded to CPU memory (%.2f GB; "
                 "%.2f GB kept on the GPU; budget %.2f GB)", peak, peak_all, budget_gb)
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
    offload_layer_inputs(model, False)
    set_activation_memory_kept(1.0)
    peak_all_kept = _peak_or_inf(step_peak_gb)
    if peak_all_kept <= budget_gb:
        log.info("activation memory: all kept (%.2f GB, budget %.2f GB)", peak_all_kept, budget_gb)
        return 0, 1.0
    checkpoint_layers(model, layer_count)
    peak_least = step_peak_gb()  # out of memory here: the caller says what to change
    if peak_least > budget_gb:
        return layer_count, plan_offloaded_layers(model, step_peak_gb, budget_gb, peak_least)
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


def plan_offloaded_layers(model, step_peak_gb, budget_gb, peak_checkpointed_gb,
                          fractions=(1.0, 0.5, 0.0)):
    """Every compiled layer checkpointed and still over `budget_gb`: offload their inputs to CPU
    memory, and let each layer keep less of its activations in its own backward while that is
    still over. Returns the fraction kept. Where none fits: the one of the least peak, with a
    warning; of peaks within 1% of each other the one that recomputes less (on an H200, keeping
    nothing cost 3 more large matmuls per layer where the peak was not in a layer's backward)."""
    offload_layer_inputs(model, True)
    peaks = {}
    for fraction in fractions:
        set_activation_memory_kept(fraction)
        peaks[fraction] = _peak_or_inf(step_peak_gb)
        if peaks[fraction] <= budget_gb:
            log.info("activation memory: every layer checkpointed, inputs offloaded to CPU memory, "
                     "%.0f%% of a layer's activations kept in its backward (%.2f GB; %.2f GB "
                     "without offloading; budget %.2f GB)", 100 * fraction, peaks[fraction],
                     peak_checkpointed_gb, budget_gb)
            return fraction
    least = min(peaks.values())
    fraction = max(f for f, peak in peaks.items() if peak <= 1.01 * least)
    set_activation_memory_kept(fraction)
    _warn_over_budget(peaks[fraction], budget_gb)
    return fraction


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
