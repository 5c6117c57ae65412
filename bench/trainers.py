"""What bench/speed.py trains with: a plain transformers + peft (+ bitsandbytes) script, what a
hand-written QLoRA script does (the base of bench/peers.py's peers), and the pipeline's trainer
in each configuration the bench measures (the default, and ablations that change one option).

The trainer is the pipeline's own set-up (speedups.load_for_training, memory_plan.plan_memory);
an ablation changes a training setting or passes an implementation choice below them as
speedups.TrainerOptions, so the choice travels as a value and its Speedups record says what ran.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.attention.varlen import varlen_attn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from batches import non_padding_tokens, target_count  # noqa: E402
from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from modeling import compute_dtype  # noqa: E402
from memory_plan import decoder_layers, plan_memory, set_activation_memory_kept  # noqa: E402
from speedups import TrainerOptions, load_for_training  # noqa: E402
from step import MicroBatch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": TARGETS}
TRAINER = {key: TRAINING_DEFAULTS[key] for key in
           ("fused_kernels", "gradient_checkpointing", "packing", "batch_tokens", "compile")}


@dataclass(frozen=True)
class Configuration:
    """A trainer configuration: training settings changed from the defaults, and the choices
    below them (speedups.TrainerOptions; the defaults are what the pipeline runs)."""
    training: dict = field(default_factory=dict)
    options: TrainerOptions = TrainerOptions()


def baseline_model(path, quantization, device="cuda"):
    """The plain script's model: from_pretrained (+ BitsAndBytesConfig),
    prepare_model_for_kbit_training / gradient_checkpointing_enable, get_peft_model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device)
    kwargs = {"dtype": compute_dtype(device), "device_map": {"": device.index or 0}
              if device.type == "cuda" else {"": "cpu"}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    torch.manual_seed(0)  # the same LoRA initialization as the trainer's
    model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model


def baseline_forward_backward(model, batch, options, normaliser=None):
    """The plain script's micro-batch: transformers' own loss, the mean over the batch's targets
    (the bench's windows are one micro-batch: `normaliser` is that count)."""
    loss = model(**batch).loss
    targets = target_count(batch)
    (loss * targets / (normaliser or targets)).backward()
    return MicroBatch(loss.item(), 0, targets, non_padding_tokens(batch))


def compile_attention_and_mlp(model):
    """The earlier compile_decoder_layers: each layer's attention and MLP compiled on their own,
    norms and residual adds eager."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for layer in decoder_layers(model):
        for name, child in layer.named_children():
            if name in ("self_attn", "mlp"):
                child.compile(dynamic=None)


def repeat_key_heads(kernel):
    """`kernel` (a varlen_attn) given one copy of each key and value head per query head:
    grouped-query attention spelled out."""
    def varlen_attn_with_copied_key_heads(query, key, value, *args, enable_gqa=False, **kwargs):
        groups = query.size(1) // key.size(1)
        return kernel(query, key.repeat_interleave(groups, 1),
                      value.repeat_interleave(groups, 1), *args, **kwargs)
    return varlen_attn_with_copied_key_heads


# name -> configuration; the memory budget is the baseline's peak unless the ablation turns the
# policy off.
ABLATIONS = {
    "fixed": {
        "precision fixes only (no fused kernels, all layers checkpointed)":
            Configuration({"fused_kernels": "none", "gradient_checkpointing": True, "compile": False}),
        "not compiled (Liger's kernels instead)": Configuration({"compile": False}),
        "each layer's attention and MLP compiled separately (norms and residual adds eager)":
            Configuration(options=TrainerOptions(compile_layers=compile_attention_and_mlp)),
        "whole layers checkpointed instead of recomputation inside the compiled layers":
            Configuration(options=TrainerOptions(recompute_in_compiled_layers=False)),
        "copies of each key head for grouped-query attention (repeat_interleave)":
            Configuration(options=TrainerOptions(varlen_kernel=repeat_key_heads(varlen_attn))),
        "no checkpointing (memory not limited)": Configuration({"gradient_checkpointing": False}),
    },
    "ultrachat": {
        "packed, SDPA block mask instead of variable-length attention":
            Configuration(options=TrainerOptions(varlen_attention=False)),
        "padded batches (packing off)": Configuration({"packing": False}),
        "batches of up to 4 x 1024 tokens (training.batch_tokens: 4096)":
            Configuration({"batch_tokens": 4096}),
    },
}


def trainer_model(path, quantization, configuration, probe_batch, budget_gb, device="cuda"):
    """The trainer's own set-up for `configuration`: the model, its speedups.Speedups record
    and its memory_plan.MemoryPlan."""
    training = {**TRAINING_DEFAULTS, **configuration.training, "memory_budget_gb": budget_gb}
    # Fresh compilations for every run (graphs of an earlier model of the same code would be
    # reused otherwise), starting from everything kept.
    set_activation_memory_kept(1.0)
    torch.manual_seed(0)  # the same LoRA initialization as the baseline's
    model, setup = load_for_training(path, quantization, LORA, training, torch.device(device),
                                     options=configuration.options)
    memory = plan_memory(model, setup.memory_policy, probe_batch, training, quantization,
                         setup.step_options)
    return model, setup, memory
