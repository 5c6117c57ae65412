"""Loading base models (bf16 on GPU, float32 on CPU, or nf4 through bitsandbytes), attaching
LoRA adapters, and reading peak memory the same way everywhere."""

import json
import resource
from pathlib import Path

import torch


def pick_device(requested="auto"):
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("training.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def compute_dtype(device):
    # bf16 is what GPUs train LoRA in; CPUs have no fast bf16 matmul everywhere, so float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-2 has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path, quantization, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs = {"dtype": dtype, "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}}
    if quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)


def model_info(path):
    """What loranotes knows about a model directory: random_init etc. ({} for hub models)."""
    info_path = Path(path) / "loranotes_model.json"
    return json.loads(info_path.read_text()) if info_path.exists() else {}


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak memory in GB and what it measures: GPU allocated/reserved, or the process's RSS."""
    if device.type == "cuda":
        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
            "memory_kind": "GPU peak allocated",
        }
    # ru_maxrss is in KiB on Linux; it is the whole process's high-water mark.
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"peak_memory_gb": rss_gb, "peak_reserved_gb": None, "memory_kind": "CPU peak RSS"}
