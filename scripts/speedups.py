"""The trainer's model set-up: the base model loaded, its speed features applied, LoRA attached.
Each feature is behind a `training:` option and measured in bench/speed.py; load_for_training
returns the model and a frozen record of what is on (Speedups).

- fused_kernels: Liger's Triton kernels for RMSNorm, SwiGLU and RoPE, and its fused linear
  cross-entropy (step.fused_token_loss_sums), which computes the loss chunk by chunk from the
  last hidden states and never holds the batch x length x vocabulary logits.
- packing (see batches.pack): on CUDA, attention over the packed conversations runs as
  variable-length flash attention, which computes no score between two conversations; `auto`
  packs on a GPU only (use_packing).
- compile: torch.compile of each decoder layer, LoRA included: fewer kernels and far less Python
  per step (the uncompiled trainer leaves the GPU waiting for the CPU). Under a memory budget it
  recomputes the cheapest activations in backward rather than whole layers (memory_plan.py).
- mixed precision: LoRA weights stay float32 for the optimizer; on CUDA their matmuls run in
  bf16 under autocast, without the float32 copy of every adapter input that peft makes otherwise.
- gradient_checkpointing: the checkpointing machinery is attached with LoRA where the memory
  policy may checkpoint layers; memory_plan.py decides how many once the model is set up.
"""

import functools
import importlib.util
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from errors import LoranotesError
from memory_plan import NONE, decoder_layers, enable_checkpointing, memory_policy
from model_sources import lora_layer_names_of, target_modules_problem
from modeling import load_base_model
from step import StepOptions, TrainingError, can_fuse_loss

log = logging.getLogger("loranotes.train")

# Architectures whose logits are exactly lm_head(last hidden state): no softcapping or scaling,
# so a loss computed from the last hidden states (fused, or logits at targets only) equals the
# plain one.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}
FUSED_MODEL_TYPES = PLAIN_HEAD_MODEL_TYPES  # Liger patches their norms, MLP and RoPE too
VARLEN_ATTENTION = "loranotes_varlen"


class SpeedupError(LoranotesError):
    """A speed option that this machine or model cannot honour."""


@dataclass(frozen=True)
class TrainerOptions:
    """Choices below the training settings. The defaults are what the pipeline runs; bench/
    passes others to measure what each one is worth."""
    compile_layers: Callable | None = None  # None: compile_decoder_layers
    recompute_in_compiled_layers: bool = True  # False: compiled layers checkpointed whole
    varlen_attention: bool = True  # False: packed batches through SDPA's block-diagonal mask
    varlen_kernel: Callable | None = None  # None: torch's varlen_attn
    bf16_autocast: bool = True  # False: float32 LoRA matmuls and peft's input casts on CUDA
    target_logits: bool = True  # False: logits at every position when the loss is not fused

    def layer_compiler(self):
        return self.compile_layers or compile_decoder_layers

    def attention_kernel(self):
        return self.varlen_kernel or _torch_varlen_attn()


@dataclass(frozen=True)
class Speedups:
    """What a run has on: decided once (decide_speedups), applied by load_for_training."""
    packed: bool  # padding-free batches (training.packing, auto decided by use_packing)
    fused_loss: bool
    target_logits: bool  # unfused loss from logits at the labelled positions only
    fused_kernels: bool  # Liger's layer kernels (uncompiled runs; compiled ones get torch's)
    varlen_attention: bool
    compiled: bool
    bf16_autocast: bool
    memory_policy: str  # one of memory_plan's policies
    compile_layers: str | None = None  # the function that compiled the layers
    attention_kernel: str | None = None  # the kernel that packed batches' attention runs in

    @property
    def step_options(self):
        return StepOptions(fused_loss=self.fused_loss, target_logits=self.target_logits,
                           bf16_autocast=self.bf16_autocast)

    def metrics(self):
        """The record's part of metrics.json."""
        return {"packed": self.packed, "fused_loss": self.fused_loss,
                "target_logits": self.target_logits, "fused_kernels": self.fused_kernels,
                "varlen_attention": self.varlen_attention, "compiled": self.compiled}


def decide_speedups(training, model_type, device, options=TrainerOptions(), varlen_available=None):
    """Which speed features a run with these `training` settings has on `device`.
    `varlen_available`: whether variable-length flash attention runs there (None: ask it)."""
    cuda = device.type == "cuda"
    fused = use_fused_kernels(training["fused_kernels"], model_type, device)
    compiled = training["compile"] and cuda
    if varlen_available is None:
        varlen_available = varlen_attention_available(device)
    packed = use_packing(training["packing"], device, training["batch_tokens"])
    varlen = packed and options.varlen_attention and varlen_available
    return Speedups(
        packed=packed,
        fused_loss=fused,  # load_for_training turns it off again for LoRA on lm_head
        target_logits=use_target_logits(fused, model_type, options),
        # Compiled layers get their norms, RoPE and SwiGLU fused by torch.compile;
        # Liger's layer kernels are for uncompiled runs.
        fused_kernels=fused and not compiled,
        varlen_attention=varlen,
        compiled=compiled,
        bf16_autocast=cuda and options.bf16_autocast,
        memory_policy=memory_policy(training["gradient_checkpointing"], cuda, compiled,
                                    options.recompute_in_compiled_layers),
        compile_layers=options.layer_compiler().__name__ if compiled else None,
        attention_kernel=options.attention_kernel().__name__ if varlen else None,
    )


def load_for_training(model_path, quantization, lora, training, device, trust_remote_code=False,
                      options=TrainerOptions()):
    """The base model with the run's speed features applied and LoRA attached, in train mode.
    Returns it and the Speedups record of what is on."""
    model = load_base_model(model_path, quantization, device, trust_remote_code)
    # The config check knows only architectures it can build offline; this covers hub models.
    problem = target_modules_problem(lora["target_modules"], lora_layer_names_of(model), model_path)
    if problem:
        raise TrainingError(f"lora.target_modules: {problem}")
    setup = decide_speedups(training, model.config.model_type, device, options)
    if setup.fused_kernels:
        apply_fused_kernels(model)
    if setup.varlen_attention:
        use_varlen_attention(model, options.attention_kernel())
    model = attach_lora(model, lora, gradient_checkpointing=setup.memory_policy != NONE)
    if setup.bf16_autocast:
        keep_adapter_inputs_bf16(model)
    if setup.compiled:
        options.layer_compiler()(model)
    model.train()  # transformers 5 loads in eval mode; dropout and checkpointing need train mode
    if setup.fused_loss and not can_fuse_loss(model):
        log.info("fused loss off: LoRA on lm_head needs the plain loss")
        setup = replace(setup, fused_loss=False,
                        target_logits=use_target_logits(False, model.config.model_type, options))
    return model, setup


def use_target_logits(fused_loss, model_type, options):
    """Logits at the labelled positions only (step.target_token_losses): wherever the loss is
    not fused and the model's logits are its output layer's (PLAIN_HEAD_MODEL_TYPES)."""
    return not fused_loss and options.target_logits and model_type in PLAIN_HEAD_MODEL_TYPES


def attach_lora(model, lora, gradient_checkpointing):
    """LoRA adapters on the frozen model; checkpointing enabled on every decoder layer (the
    memory plan then keeps some layers' activations).

    Not peft's prepare_model_for_kbit_training: it casts the norms (and embeddings) of a 4-bit
    model to float32, which turns every activation after them float32 too: twice the activation
    memory and float32 attention (measured in bench/speed.py).
    """
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        enable_checkpointing(model)
    config = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


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
    separately, in step.fused_token_loss_sums). Call before attaching LoRA.

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
    (memory_plan.set_activation_memory_kept). The layers share that graph. The checkpointing wrapper
    (transformers' GradientCheckpointingLayer.__call__) stays outside it, so checkpointing
    still applies per layer."""
    import torch._dynamo

    # A model torch.compile cannot trace runs uncompiled, with a warning, rather than failing.
    torch._dynamo.config.suppress_errors = True
    for layer in decoder_layers(model):
        layer.compile(dynamic=None)


# --- mixed precision -----------------------------------------------------------------------------

def keep_adapter_inputs_bf16(model):
    """Stop peft from casting each adapter's input to the adapter's dtype (float32): on a bf16
    model that is a float32 copy of the input of every one of the 7 projections in every layer,
    kept for backward. step.bf16_autocast casts the (tiny) adapter weights instead."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


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
        _torch_varlen_attn()
    except ImportError:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def use_varlen_attention(model, varlen_kernel=None):
    """Route this model's attention through varlen_attention: packed batches get flash attention
    per conversation, in `varlen_kernel` (torch's varlen_attn by default), other batches the
    usual SDPA."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    attention = functools.partial(varlen_attention, varlen_kernel=varlen_kernel or _torch_varlen_attn())
    AttentionInterface.register(VARLEN_ATTENTION, attention)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    model.set_attn_implementation(VARLEN_ATTENTION)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *,
                     varlen_kernel, **kwargs):
    """transformers' attention interface: flash attention per packed conversation when the batch
    carries `cu_seq_lens_q` (batches.pack), SDPA with the mask otherwise (padded batches, eval)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    # Sliding windows, logit soft-capping, attention sinks and attention dropout are not
    # implemented here: SDPA with transformers' packed mask handles them.
    unsupported = dropout or any(kwargs.get(key) for key in ("sliding_window", "softcap", "s_aux"))
    if bounds is None or unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    # (1, heads, tokens, dim) -> (tokens, heads, dim)
    query, key, value = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    max_length = kwargs["max_length_q"]
    out = varlen_kernel(query, key, value, bounds, bounds, max_length, max_length,
                        scale=scaling, **_VARLEN_OPTIONS)
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), no attention weights


def _torch_varlen_attn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


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


