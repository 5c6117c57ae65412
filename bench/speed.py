"""Training speed and memory: a plain transformers + peft script vs the pipeline's trainer.

Both run on the same GPU in one call, for the seed's three variants (Qwen3-4B nf4, Qwen3-4B
bf16, Llama-2-7b nf4), with random weights of the real architectures (speed does not depend on
the weights), LoRA r=1 on the 7 projection matrices, AdamW, the same batches.

- baseline: what a hand-written QLoRA script does: from_pretrained (+ BitsAndBytesConfig),
  prepare_model_for_kbit_training / gradient_checkpointing_enable, get_peft_model, padded
  batches, `model(**batch, labels=labels).loss.backward()`, optimizer step.
- trainer: scripts/train.py's own setup and step (load_for_training, choose_checkpointing,
  forward_backward) with the default speed options; the memory budget of its checkpointing
  policy is the baseline's measured peak, so it never uses more memory than the baseline.
- ablations: the trainer with one option changed, to measure what each option does.

Workloads: `fixed` is 4 x 1024 random tokens, every token a target, no padding. With
--ultrachat FILE.jsonl, `ultrachat` uses real UltraChat conversation lengths (characters / 4,
capped at 1024 like the pipeline's max_length): padded batches for the baseline, packed ones of
the same conversations for the trainer; tokens/s counts non-padding tokens.

    python bench/speed.py OUT.json [--variants v1 v2 v3] [--ultrachat FILE] [--profile DIR]
                                   [--no-ablations]

A full run with every ablation takes several minutes per variant on an H100; the committed
results are from several runs of subsets (their `run` labels), each with its own baseline.

Each variant runs in its own process (Liger patches transformers' modules in place; the
baseline must see them unpatched). Rows of variants not run now are kept from an existing
OUT.json of the same card.

MFU counts useful FLOPs: 4 x the matmul parameters per token (speedups.flops_per_token: forward
2N and the input-gradient half of backward 2N; frozen weights get no weight gradient) plus
causal attention, 6 x layers x heads x head_dim x length^2 per sequence (speedups.attention_flops);
recomputation is not counted. Over the card's bf16 matmul rate measured in the same run (8192^3
products).
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.attention.varlen as varlen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import speedups  # noqa: E402
import train  # noqa: E402
from build_model import random_init_model  # noqa: E402
from model_sources import KNOWN_ARCHITECTURES  # noqa: E402
from experiment_config import TRAINING_DEFAULTS  # noqa: E402

VARIANTS = {
    "v1": ("Qwen/Qwen3-4B", "nf4"),
    "v2": ("Qwen/Qwen3-4B", "none"),
    "v3": ("meta-llama/Llama-2-7b-hf", "nf4"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 1, "alpha": 2, "dropout": 0.0, "target_modules": TARGETS}
TRAINER = {key: TRAINING_DEFAULTS[key] for key in
           ("fused_kernels", "gradient_checkpointing", "packing", "batch_tokens", "compile")}
DEVICE = "cuda"  # tests/test_bench.py runs the trainer's side on the CPU
# name -> (trainer options changed from the defaults, workload); the memory budget is the
# baseline's peak unless the ablation turns the policy off.
ABLATIONS = {
    "fixed": {
        "precision fixes only (no fused kernels, all layers checkpointed)":
            {"fused_kernels": "none", "gradient_checkpointing": True, "compile": False},
        "not compiled (Liger's kernels instead)": {"compile": False},
        "each layer's attention and MLP compiled separately (norms and residual adds eager)":
            {"attention_and_mlp": True},
        "whole layers checkpointed instead of recomputation inside the compiled layers":
            {"layer_policy": True},
        "copies of each key head for grouped-query attention (repeat_interleave)":
            {"repeat_kv_heads": True},
        "no checkpointing (memory not limited)": {"gradient_checkpointing": False},
    },
    "ultrachat": {
        "packed, SDPA block mask instead of variable-length attention": {"varlen": False},
        "padded batches (packing off)": {"packing": False},
        "batches of up to 4 x 1024 tokens (training.batch_tokens: 4096)": {"batch_tokens": 4096},
    },
}
# ablation switches that are not training options
BENCH_ONLY = ("varlen", "layer_policy", "repeat_kv_heads", "attention_and_mlp")
ORIGINALS = {(module, name): getattr(module, name) for module, name in (
    (train, "varlen_attention_available"), (train, "plan_activation_memory"),
    (train, "compile_decoder_layers"), (varlen, "varlen_attn"))}


def save_random_model(hub_id, directory):
    """The real architecture with random bf16 weights, saved so both runs load it the same way."""
    from transformers import AutoConfig

    if (Path(directory) / "config.json").exists():
        return
    spec = dict(KNOWN_ARCHITECTURES[hub_id])
    model = random_init_model(AutoConfig.for_model(spec.pop("architecture"), **spec))
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
    torch.manual_seed(0)  # the same LoRA initialization as the trainer's
    model = get_peft_model(model, LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        return loss.item()

    return model, step


def compile_attention_and_mlp(model):
    """The earlier compile_decoder_layers: each layer's attention and MLP compiled on their own,
    norms and residual adds eager."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    for layer in speedups.decoder_layers(model):
        for name, child in layer.named_children():
            if name in ("self_attn", "mlp"):
                child.compile(dynamic=None)


def layer_checkpointing_plan(model, step_peak_gb, budget_gb):
    """The uncompiled trainer's policy on compiled layers: whole layers checkpointed."""
    return speedups.plan_checkpointing(model, step_peak_gb, budget_gb), 1.0


def repeat_key_heads(varlen_attn):
    """varlen_attn given one copy of each key and value head per query head (GQA spelled out)."""
    def attention(query, key, value, *args, enable_gqa=False, **kwargs):
        groups = query.size(1) // key.size(1)
        return varlen_attn(query, key.repeat_interleave(groups, 1),
                           value.repeat_interleave(groups, 1), *args, **kwargs)
    return attention


def trainer_model(path, quantization, options, probe_batch, budget_gb):
    training = {**TRAINER, **{k: v for k, v in options.items() if k not in BENCH_ONLY},
                "memory_budget_gb": budget_gb}
    # Fresh compilations for every run (graphs of an earlier model of the same code would be
    # reused otherwise), starting from everything kept.
    speedups.set_activation_memory_kept(1.0)
    # This run's ablation patches, the originals elsewhere; they stay for the run's steps, since
    # the compiled layers trace them at their first step.
    patches = {
        (train, "varlen_attention_available"): options.get("varlen") is False and (lambda device: False),
        (train, "plan_activation_memory"): options.get("layer_policy") and layer_checkpointing_plan,
        (train, "compile_decoder_layers"): options.get("attention_and_mlp") and compile_attention_and_mlp,
        (varlen, "varlen_attn"): options.get("repeat_kv_heads") and repeat_key_heads(ORIGINALS[varlen, "varlen_attn"]),
    }
    for (module, name), patch in patches.items():
        setattr(module, name, patch or ORIGINALS[module, name])
    torch.manual_seed(0)  # the same LoRA initialization as the baseline's
    model, speed = train.load_for_training(path, quantization, LORA, training, torch.device(DEVICE))
    plan = train.choose_checkpointing(model, training, quantization, probe_batch,
                                      speed["fused_loss"], speed["compiled"])
    speed.update(checkpointed=plan["gradient_checkpointing_layers"], activations_kept=plan["activations_kept"])
    fused = speed["fused_loss"]
    return model, lambda batch: train.forward_backward(model, batch, fused_loss=fused)[0], speed


def measure(model, step, batches, steps, warmup, profile_to=None):
    """Median s/step, non-padding tokens/s, peak memory and the per-step losses.

    `batches` are cycled: step i trains on batches[i % len(batches)], the same sequence for
    every run that is given the same list. Peak memory covers the training steps.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    # each batch's attention FLOPs, read before the timed steps (reading them syncs the GPU)
    attention = [speedups.attention_flops(model.config, sequence_lengths(batch)) for batch in batches]
    torch.cuda.reset_peak_memory_stats()
    times, tokens, losses, first_step_s, attention_sum = [], [], [], None, 0
    for index in range(warmup + steps):
        batch = batches[index % len(batches)]
        torch.cuda.synchronize()
        started = time.perf_counter()
        loss = step(batch)
        losses.append(float(loss))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index == 0:  # includes torch.compile's compilation, when on
            first_step_s = time.perf_counter() - started
        if index >= warmup:
            times.append(time.perf_counter() - started)
            tokens.append(sum(sequence_lengths(batch)))
            attention_sum += attention[index % len(batches)]
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    if profile_to:
        profile_step(step, batches[0], profile_to)
    return {"s_per_step": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "attention_flops_per_s": attention_sum / sum(times),
            "peak_gb": peak_gb, "losses": losses, "first_step_s": first_step_s,
            "spread": (max(times) - min(times)) / statistics.median(times)}


def sequence_lengths(batch):
    """The real (non-padding) length of each sequence in a padded or packed batch."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].diff().tolist()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(1).tolist()
    return [batch["input_ids"].size(1)] * batch["input_ids"].size(0)


def mfu(result, flops_per_token, peak_tflops):
    """Useful FLOPs (matmuls and attention, no recomputation) per second over the card's rate."""
    return (result["tokens_per_s"] * flops_per_token + result["attention_flops_per_s"]) / (peak_tflops * 1e12)


def profile_step(step, batch, path):
    """The CUDA kernels of one training step, by total time: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    Path(path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def release():
    """Free the GPU memory of models the caller has deleted."""
    gc.collect()
    torch.cuda.empty_cache()


def fixed_batches(vocab_size, batch, seq_len):
    """One batch of `batch` x `seq_len` random tokens, every token a target: padded (here: no
    padding) for the baseline, packed for the trainer."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    examples = [(row.tolist(), row.tolist()) for row in input_ids]
    return {"padded": [train.collate(examples, 0, DEVICE)], "packed": [train.pack(examples, 0, DEVICE)]}


def conversation_lengths(jsonl_path, max_length):
    """Token lengths of real UltraChat conversations, estimated as characters / 4 (the models'
    real tokenizers are not available offline), capped at max_length as the pipeline truncates."""
    with open(jsonl_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [min(max_length, max(8, sum(len(m["content"]) for m in row["messages"]) // 4))
            for row in rows]


def ultrachat_batches(vocab_size, batch, lengths, count, batch_tokens):
    """`count` batches of `batch` conversations with real lengths: padded for the baseline (what a
    hand-written script does), packed for the trainer, same tokens in both; and `count` packed
    batches of up to `batch_tokens` tokens of the same conversation stream (training.batch_tokens)."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    conversations = []
    for index in order:
        ids = torch.randint(0, vocab_size, (lengths[index],), generator=generator).tolist()
        conversations.append((ids, ids))
    padded, packed = [], []
    for start in range(0, batch * count, batch):
        examples = conversations[start : start + batch]
        padded.append(train.collate(examples, pad_id=0, device=DEVICE))
        packed.append(train.pack(examples, pad_id=0, device=DEVICE))
    budget = [train.pack(examples, pad_id=0, device=DEVICE)
              for examples, _ in zip(train.token_budget_batches(conversations, batch_tokens), range(count))]
    return {"padded": padded, "packed": packed, "budget": budget}


def largest(batches):
    return max(batches, key=lambda batch: batch["input_ids"].numel())


def max_loss_difference(ours, base):
    return max(abs(a - b) for a, b in zip(ours["losses"], base["losses"]))


def run_variant(variant, args, peak_tflops):
    """All measurements of one variant: baseline and trainer per workload, then ablations."""
    hub_id, quantization = VARIANTS[variant]
    directory = str(args.models / hub_id.replace("/", "--"))
    save_random_model(hub_id, directory)
    vocab_size = KNOWN_ARCHITECTURES[hub_id]["vocab_size"]
    workloads = {}  # UltraChat first: none of its runs patch transformers (see `later` below)
    if args.ultrachat:
        lengths = conversation_lengths(args.ultrachat, args.seq_len)
        workloads["ultrachat"] = ultrachat_batches(vocab_size, args.batch, lengths,
                                                   args.warmup + args.steps, args.batch * args.seq_len)
    workloads["fixed"] = fixed_batches(vocab_size, args.batch, args.seq_len)
    rows, ablations = [], []
    for workload, batches_of in workloads.items():
        padded = batches_of["padded"]
        model, step = baseline_model(directory, quantization)
        base = measure(model, step, padded, args.steps, args.warmup,
                       args.profile and args.profile / f"{variant}-{workload}-baseline.txt")
        del model, step
        release()
        print(f"{variant} {workload} baseline: {base['tokens_per_s']:.0f} tok/s, "
              f"{base['peak_gb']:.2f} GB", flush=True)

        def run_ablation(name, options, base):
            budget = None if options.get("gradient_checkpointing") is False else base["peak_gb"]
            try:
                return trainer_run(options, budget)
            except Exception as error:  # an option that fails here is reported, not fatal
                release()
                print(f"{variant} {workload} {name}: failed: {type(error).__name__}: {error}", flush=True)
                return None

        def trainer_run(options, budget_gb, profile_name=None):
            if options.get("batch_tokens"):
                batches = batches_of["budget"]
            else:
                batches = batches_of["packed" if options.get("packing", TRAINER["packing"]) else "padded"]
            model, step, speed = trainer_model(directory, quantization, options,
                                               largest(batches), budget_gb)
            flops = speedups.flops_per_token(model)
            result = measure(model, step, batches, args.steps, args.warmup,
                             profile_name and args.profile and args.profile / profile_name)
            del model, step
            release()
            result.update(speed=speed, mfu=mfu(result, flops, peak_tflops), flops_per_token=flops)
            return result

        # Runs with Liger's module kernels (uncompiled, fused) go last: Liger patches
        # transformers' modules for the rest of the process (speedups.apply_fused_kernels).
        chosen = {} if args.no_ablations else ABLATIONS[workload]
        later = {name: options for name, options in chosen.items()
                 if options.get("compile") is False and options.get("fused_kernels") != "none"}
        ours = trainer_run({}, base["peak_gb"], f"{variant}-{workload}-trainer.txt")
        row = {
            "variant": variant, "model": hub_id, "quantization": quantization, "workload": workload,
            "batch": args.batch, "seq_len": args.seq_len,
            "tokens_per_s": ours["tokens_per_s"], "baseline_tokens_per_s": base["tokens_per_s"],
            "speedup": ours["tokens_per_s"] / base["tokens_per_s"],
            "s_per_step": ours["s_per_step"], "baseline_s_per_step": base["s_per_step"],
            "peak_gb": ours["peak_gb"], "baseline_peak_gb": base["peak_gb"],
            "mfu": ours["mfu"],
            "baseline_mfu": mfu(base, ours["flops_per_token"], peak_tflops),
            "speed_options": ours["speed"],
            "mean_loss": statistics.mean(ours["losses"]),
            "baseline_mean_loss": statistics.mean(base["losses"]),
            "max_step_loss_difference": max_loss_difference(ours, base),
            "timing_spread": max(ours["spread"], base["spread"]),
            "first_step_s": ours["first_step_s"], "baseline_first_step_s": base["first_step_s"],
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        ablation_results = {name: run_ablation(name, options, base)
                            for name, options in chosen.items() if name not in later}
        ablation_results.update({name: run_ablation(name, options, base) for name, options in later.items()})
        for name, result in ablation_results.items():
            if result is None:
                continue
            ablation = {
                "variant": variant, "workload": workload, "ablation": name,
                "tokens_per_s": result["tokens_per_s"], "s_per_step": result["s_per_step"],
                "peak_gb": result["peak_gb"], "mfu": result["mfu"],
                "speedup_vs_baseline": result["tokens_per_s"] / base["tokens_per_s"],
                "speed_options": result["speed"], "first_step_s": result["first_step_s"],
                "max_step_loss_difference": max_loss_difference(result, base),
            }
            ablations.append(ablation)
            print(json.dumps(ablation), flush=True)
    return rows, ablations


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--fixed-only", action="store_true", help="skip the UltraChat workload")
    parser.add_argument("--no-ablations", action="store_true", help="baseline and trainer only")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ultrachat", type=Path, default=None,
                        help="an ultrachat_200k-format .jsonl: adds the variable-length workload")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a directory: write one profiled step's kernel table per run there")
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)

    if args.child:  # one variant, in a process of its own; rows go to OUT as JSON
        peak_tflops = json.loads(args.out.read_text())["bf16_matmul_tflops"]
        rows, ablations = run_variant(args.variants[0], args, peak_tflops)
        args.out.write_text(json.dumps({"rows": rows, "ablations": ablations}))
        return

    import peft
    import transformers

    card = torch.cuda.get_device_name()
    peak_tflops = speedups.bf16_matmul_tflops(torch.device("cuda"))
    print(f"{card}: bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    result = {
        "card": card,
        "bf16_matmul_tflops": peak_tflops,
        "versions": {package: _version(package) for package in
                     ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel")},
        "flops_per_token": "4 x matmul parameters (forward + input-gradient backward; "
                           "no recomputation) + causal attention 6 x layers x heads x head_dim x "
                           "length^2 per sequence (forward + backward)",
        "trainer_defaults": TRAINER,
        "rows": [],
        "ablations": [],
    }
    if args.out.exists():  # keep the other variants' rows measured on this card
        earlier = json.loads(args.out.read_text())
        if earlier.get("card") == card:
            for key in ("rows", "ablations"):
                result[key] = [r for r in earlier.get(key, []) if r["variant"] not in args.variants]
    del peft, transformers
    for variant in args.variants:
        child_out = args.out.with_suffix(f".{variant}.part")
        child_out.write_text(json.dumps({"bf16_matmul_tflops": peak_tflops}))
        command = [sys.executable, __file__, str(child_out), "--child", "--variants", variant,
                   "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                   "--models", str(args.models)]
        if args.no_ablations:
            command.append("--no-ablations")
        if args.ultrachat and not args.fixed_only:
            command += ["--ultrachat", str(args.ultrachat)]
        if args.profile:
            command += ["--profile", str(args.profile)]
        subprocess.run(command, check=True)
        part = json.loads(child_out.read_text())
        child_out.unlink()
        result["rows"] += part["rows"]
        result["ablations"] += part["ablations"]
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each variant
    order = list(VARIANTS)
    result["rows"].sort(key=lambda r: (order.index(r["variant"]), r["workload"]))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def print_table(result):
    print(f"\n{result['card']}, bf16 matmul {result['bf16_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'variant':8}{'workload':11}{'tok/s':>9}{'base tok/s':>12}{'speedup':>9}{'s/step':>8}"
          f"{'base s/step':>12}{'peak GB':>9}{'base GB':>9}{'MFU':>7}{'loss diff':>11}")
    for r in result["rows"]:
        print(f"{r['variant']:8}{r['workload']:11}{r['tokens_per_s']:9.0f}"
              f"{r['baseline_tokens_per_s']:12.0f}{r['speedup']:9.2f}{r['s_per_step']:8.3f}"
              f"{r['baseline_s_per_step']:12.3f}{r['peak_gb']:9.1f}{r['baseline_peak_gb']:9.1f}"
              f"{r['mfu']:7.1%}{r['max_step_loss_difference']:11.4f}")
    for a in result["ablations"]:
        print(f"  {a['variant']} {a['workload']:10} {a['tokens_per_s']:7.0f} tok/s "
              f"{a['speedup_vs_baseline']:5.2f}x {a['peak_gb']:6.1f} GB  {a['ablation']}")


def _version(package):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
