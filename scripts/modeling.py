"""Loading base models (bf16 on GPU, float32 on CPU, or nf4 through bitsandbytes) and their
tokenizers, and reading peak memory the same way everywhere.

torch is imported inside the functions that use it: the tokenize job imports this module only
for load_tokenizer, and importing torch would add 2-3 s to that job (bench/startup.py).
"""

import contextlib
import json
import resource
from pathlib import Path

from errors import first_line
from model_sources import ModelError, is_local, local_model_problem

# Tokenizer classes that are a `tokenizers` file and nothing else: what build_model saves.
PLAIN_TOKENIZER_CLASSES = {"PreTrainedTokenizerFast", "TokenizersBackend"}


def pick_device(requested="auto"):
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("training.device is 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def compute_dtype(device):
    import torch

    # bf16 is what GPUs train LoRA in; CPUs have no fast bf16 matmul everywhere, so float32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@contextlib.contextmanager
def explained_load_errors(path):
    """Turn a loader's long error (offline hub, missing files) into a one-line ModelError."""
    try:
        yield
    except (OSError, ValueError, ImportError) as error:  # hub and network errors are OSErrors
        if is_local(path) or not isinstance(error, OSError):
            raise ModelError(f"could not load {path}: {first_line(error)}") from error
        raise ModelError(
            f"could not download {path} ({first_line(error)}). No network, or HF_HUB_OFFLINE "
            f"is set, and it is not in the local cache: download it first (`hf download {path}`; "
            "gated models need HF_TOKEN in the environment), or point the model's path: at a "
            "local directory"
        ) from error


def require_bitsandbytes():
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # not installed, or its native library fails to load
        raise ModelError(
            f"quantization nf4 needs a working bitsandbytes ({first_line(error)}): "
            "`pip install -U bitsandbytes`, or set the variant's quantization: none"
        ) from error


def is_plain_tokenizer(path):
    """Whether a local directory holds a tokenizer that is only a `tokenizers` file (every model
    loranotes builds), which PreTrainedTokenizerFast loads as AutoTokenizer would."""
    config = Path(path).expanduser() / "tokenizer_config.json"
    if not (config.is_file() and config.with_name("tokenizer.json").is_file()):
        return False
    return json.loads(config.read_text()).get("tokenizer_class") in PLAIN_TOKENIZER_CLASSES


def load_tokenizer(path, trust_remote_code=False):
    # AutoTokenizer imports torch and transformers' model configs to choose a class (about 2 s);
    # a plain tokenizer needs neither, so tokenizing for a built model stays a light job.
    with explained_load_errors(path):
        if is_plain_tokenizer(path):
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:  # Llama-2 has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path, quantization, device, trust_remote_code=False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(device)
    kwargs = {"dtype": dtype, "device_map": {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}}
    problem = local_model_problem(path)  # a tokenizer loads without weights; a model does not
    if problem:
        raise ModelError(problem)
    if quantization == "nf4":
        require_bitsandbytes()
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
        )
    with explained_load_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    if quantization == "nf4" and device.type == "cpu":
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference and then
        # requires every layer width to be a multiple of 32 (stories260k's 172 is not). The
        # portable kernel has no such limit and these CPU runs are small anyway.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    return model


def reset_peak_memory(device):
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    """Peak memory in GB and what it measures: GPU allocated/reserved, or the process's RSS."""
    import torch

    if device.type == "cuda":
        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
            "memory_kind": "GPU peak allocated",
        }
    # ru_maxrss is in KiB on Linux; it is the whole process's high-water mark.
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return {"peak_memory_gb": rss_gb, "peak_reserved_gb": None, "memory_kind": "CPU peak RSS"}
