"""The tools a user would train with instead of the pipeline's trainer, as bench/speed.py runs
them next to it on the same batches: each a `Peer` value that loads its model and runs its
micro-batch, so the bench picks one by name and never patches another in.

- plain: a hand-written transformers + peft (+ bitsandbytes) QLoRA script.
- liger: the same script with Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear
  cross-entropy) patched into transformers before the model loads; gradient checkpointing on.
- unsloth: FastLanguageModel.from_pretrained on the same local weights, get_peft_model (r=1,
  alpha=2, the 7 projections, use_gradient_checkpointing="unsloth": checkpointed layer inputs
  offloaded to CPU memory), its own loss; forward under bf16 autocast as its SFTTrainer runs it
  (bf16=True).

All train LoRA r=1 with the same optimizer step (step.train_step: clipping, AdamW) on padded
batches, what each tool's users feed it. Liger and Unsloth patch transformers' modules for the
rest of the process: each peer runs in a process of its own.
"""

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainers import LORA, TARGETS, baseline_forward_backward, baseline_model  # noqa: E402


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    load: Callable  # (model directory, quantization, max sequence length, device) -> model, train mode
    forward_backward: Callable  # step.forward_backward's signature
    requires: tuple = ()  # modules it imports
    needs_cuda: bool = False
    first_import: str | None = None  # a module that must be imported before transformers

    def unavailable(self, device):
        """Why this peer cannot run on `device`, or None."""
        missing = [module for module in self.requires if importlib.util.find_spec(module) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install {' '.join(missing)})"
        if self.needs_cuda and torch.device(device).type != "cuda":
            return f"{self.name} runs Triton kernels and needs a CUDA GPU"
        return None


def plain_model(path, quantization, max_seq_length, device):
    return baseline_model(path, quantization, device)


def liger_model(path, quantization, max_seq_length, device):
    """Liger's kernels patched into transformers' module of this architecture (all of them, the
    fused linear cross-entropy included), then the plain script's set-up."""
    from liger_kernel.transformers import _apply_liger_kernel
    from transformers import AutoConfig

    _apply_liger_kernel(AutoConfig.from_pretrained(path).model_type)
    return baseline_model(path, quantization, device)


def unsloth_arguments(path, quantization, max_seq_length):
    """FastLanguageModel.from_pretrained's and get_peft_model's arguments: the bench's LoRA
    (r=1, alpha=2, no dropout, the 7 projections) with Unsloth's offloaded checkpointing."""
    load = {"model_name": path, "max_seq_length": max_seq_length, "dtype": torch.bfloat16,
            "load_in_4bit": quantization == "nf4", "load_in_16bit": quantization != "nf4",
            "use_exact_model_name": True, "use_gradient_checkpointing": "unsloth"}
    lora = {"r": LORA["r"], "lora_alpha": LORA["alpha"], "lora_dropout": LORA["dropout"],
            "target_modules": TARGETS, "bias": "none", "use_gradient_checkpointing": "unsloth",
            "random_state": 0}
    return load, lora


def unsloth_model(path, quantization, max_seq_length, device):
    from unsloth import FastLanguageModel

    load, lora = unsloth_arguments(path, quantization, max_seq_length)
    model, _ = FastLanguageModel.from_pretrained(**load)
    model = FastLanguageModel.get_peft_model(model, **lora)
    model.train()
    return model


def autocast_forward_backward(model, batch, options, normaliser=None):
    """The plain micro-batch under bf16 autocast (Unsloth's adapters are float32)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return baseline_forward_backward(model, batch, options, normaliser)


PEERS = {
    "plain": Peer("plain", "transformers + peft (+ bitsandbytes), gradient checkpointing",
                  plain_model, baseline_forward_backward),
    "liger": Peer("liger", "plain + Liger kernels (fused linear cross-entropy), gradient checkpointing",
                  liger_model, baseline_forward_backward, requires=("liger_kernel",), needs_cuda=True),
    "unsloth": Peer("unsloth", "Unsloth FastLanguageModel, use_gradient_checkpointing='unsloth'",
                    unsloth_model, autocast_forward_backward, requires=("unsloth",),
                    needs_cuda=True, first_import="unsloth"),
}
