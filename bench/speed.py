"""Training speed and memory: a plain transformers + peft script vs the pipeline's trainer.

Both run side by side on the same GPU in one process, for the seed's three variants (Qwen3-4B
nf4, Qwen3-4B bf16, Llama-2-7b nf4), with random weights of the real architectures (speed does
not depend on the weights), the same batch (4 x 1024 tokens, every token a target), LoRA r=1 on
the 7 projection matrices, gradient checkpointing and AdamW.

- baseline: what a hand-written QLoRA script does: from_pretrained (+ BitsAndBytesConfig),
  prepare_model_for_kbit_training / gradient_checkpointing_enable, get_peft_model,
  `model(input_ids, labels=labels).loss.backward()`, optimizer step.
- pipeline: scripts/train.py's own functions (load_base_model, attach_lora, forward_backward).

With --ultrachat FILE.jsonl a second workload uses real UltraChat conversation lengths: the
baseline gets padded batches, the trainer packed (padding-free) ones of the same tokens, and
tokens/s counts non-padding tokens.

    python bench/speed.py OUT.json [--steps 10] [--warmup 3] [--ultrachat FILE.jsonl]

MFU counts 4 x parameters FLOPs per token: forward 2N and the input-gradient half of the
backward 2N (frozen weights get no weight gradient; LoRA's own FLOPs, attention scores and the
recomputation of gradient checkpointing are left out), over the card's bf16 matmul rate measured
in the same run (8192^3 products).
"""

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_model import KNOWN_ARCHITECTURES  # noqa: E402
from train import attach_lora, collate, forward_backward, pack  # noqa: E402
from modeling import load_base_model  # noqa: E402

VARIANTS = [
    ("v1", "Qwen/Qwen3-4B", "nf4"),
    ("v2", "Qwen/Qwen3-4B", "none"),
    ("v3", "meta-llama/Llama-2-7b-hf", "nf4"),
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": TARGETS}


def matmul_tflops(size=8192, repeats=10):
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def save_random_model(hub_id, directory):
    """The real architecture with random bf16 weights, saved so both runs load it the same way."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (Path(directory) / "config.json").exists():
        return
    spec = dict(KNOWN_ARCHITECTURES[hub_id])
    config = AutoConfig.for_model(spec.pop("architecture"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def baseline_model(path, quantization):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
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
    model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    return model


def baseline_step(model, batch):
    loss = model(**batch).loss
    loss.backward()
    return loss.item()


def pipeline_model(path, quantization):
    model = load_base_model(path, quantization, torch.device("cuda"))
    model = attach_lora(model, LORA, quantization == "nf4", gradient_checkpointing=True)
    model.train()
    return model


def pipeline_step(model, batch):
    return forward_backward(model, batch)[0]


def measure(make_model, step, path, quantization, batches, steps, warmup):
    """Median s/step, non-padding tokens/s and peak memory over `steps` timed steps.

    `batches` are cycled: step i trains on batches[i % len(batches)], the same sequence for
    every run that is given the same list.
    """
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = make_model(path, quantization)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    times, tokens, losses = [], [], []
    for index in range(warmup + steps):
        batch = batches[index % len(batches)]
        torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(step(model, batch))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - started)
            mask = batch.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    del model, optimizer, params
    gc.collect()
    torch.cuda.empty_cache()
    return {"s_per_step": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "peak_gb": peak_gb, "losses": losses,
            "spread": (max(times) - min(times)) / statistics.median(times)}


def fixed_batches(vocab_size, batch, seq_len):
    """One batch of `batch` x `seq_len` random tokens, every token a target; no padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    fixed = {"input_ids": input_ids.cuda(), "attention_mask": torch.ones_like(input_ids).cuda(),
             "labels": input_ids.cuda()}
    return [fixed], [fixed]


def conversation_lengths(jsonl_path, max_length):
    """Token lengths of real UltraChat conversations, estimated as characters / 4 (the models'
    real tokenizers are not available offline), capped at max_length as the pipeline truncates."""
    with open(jsonl_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [min(max_length, max(8, sum(len(m["content"]) for m in row["messages"]) // 4))
            for row in rows]


def ultrachat_batches(vocab_size, batch, lengths, count, device="cuda"):
    """`count` batches of `batch` conversations with real lengths: padded for the baseline (what a
    hand-written script does), packed for the pipeline's trainer. Same tokens in both."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    padded, packed = [], []
    for start in range(0, batch * count, batch):
        examples = []
        for index in order[start : start + batch]:
            ids = torch.randint(0, vocab_size, (lengths[index],), generator=generator).tolist()
            examples.append((ids, ids))
        padded.append(collate(examples, pad_id=0, device=device))
        packed.append(pack(examples, pad_id=0, device=device))
    return padded, packed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ultrachat", type=Path, default=None,
                        help="an ultrachat_200k-format .jsonl: adds the variable-length workload")
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    args = parser.parse_args()

    import peft
    import transformers

    card = torch.cuda.get_device_name()
    peak_tflops = matmul_tflops()
    print(f"{card}: bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    rows = []
    for variant, hub_id, quantization in VARIANTS:
        directory = str(args.models / hub_id.replace("/", "--"))
        save_random_model(hub_id, directory)
        spec = KNOWN_ARCHITECTURES[hub_id]
        n_params = parameter_count(spec)
        workloads = {"fixed": fixed_batches(spec["vocab_size"], args.batch, args.seq_len)}
        if args.ultrachat:
            lengths = conversation_lengths(args.ultrachat, args.seq_len)
            workloads["ultrachat"] = ultrachat_batches(
                spec["vocab_size"], args.batch, lengths, args.warmup + args.steps
            )
        for workload, (baseline_batches, pipeline_batches) in workloads.items():
            base = measure(baseline_model, baseline_step, directory, quantization,
                           baseline_batches, args.steps, args.warmup)
            ours = measure(pipeline_model, pipeline_step, directory, quantization,
                           pipeline_batches, args.steps, args.warmup)
            row = {
                "variant": variant, "model": hub_id, "quantization": quantization,
                "workload": workload, "batch": args.batch, "seq_len": args.seq_len,
                "tokens_per_s": ours["tokens_per_s"],
                "baseline_tokens_per_s": base["tokens_per_s"],
                "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
                "s_per_step": ours["s_per_step"], "baseline_s_per_step": base["s_per_step"],
                "peak_gb": ours["peak_gb"], "baseline_peak_gb": base["peak_gb"],
                "mfu": 4 * n_params * ours["tokens_per_s"] / (peak_tflops * 1e12),
                "baseline_mfu": 4 * n_params * base["tokens_per_s"] / (peak_tflops * 1e12),
                "first_step_loss": ours["losses"][0],
                "baseline_first_step_loss": base["losses"][0],
                "timing_spread": max(ours["spread"], base["spread"]),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        "card": card,
        "bf16_matmul_tflops": peak_tflops,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "bitsandbytes": _version("bitsandbytes")},
        "flops_per_token": "4 x parameters (forward + input-gradient backward; no recomputation)",
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'variant':8}{'workload':11}{'tok/s':>9}{'base tok/s':>12}{'speedup':>9}"
          f"{'peak GB':>9}{'base GB':>9}{'MFU':>7}")
    for r in rows:
        print(f"{r['variant']:8}{r['workload']:11}{r['tokens_per_s']:9.0f}"
              f"{r['baseline_tokens_per_s']:12.0f}{r['speedup']:9.2f}{r['peak_gb']:9.1f}"
              f"{r['baseline_peak_gb']:9.1f}{r['mfu']:7.1%}")


def parameter_count(spec):
    """Parameters of the architecture, from its config values (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("architecture"), **spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _version(package):
    import importlib.metadata

    return importlib.metadata.version(package)


if __name__ == "__main__":
    main()
