"""Training speed and memory: a plain transformers + peft script vs the pipeline's trainer.

Both run on the same GPU in one call, for the seed's three variants (Qwen3-4B nf4, Qwen3-4B
bf16, Llama-2-7b nf4), with random weights of the real architectures (speed does not depend on
the weights), LoRA r=1 on the 7 projection matrices, AdamW, the same batches
(bench/workloads.py).

- baseline: what a hand-written QLoRA script does: from_pretrained (+ BitsAndBytesConfig),
  prepare_model_for_kbit_training / gradient_checkpointing_enable, get_peft_model, padded
  batches, `model(**batch, labels=labels).loss.backward()`, optimizer step.
- trainer: the pipeline's own set-up and step with the default speed options; the memory
  budget of its checkpointing policy is the baseline's measured peak, so it never uses more
  memory than the baseline.
- ablations: the trainer with one option changed, to measure what each option does
  (bench/trainers.py).

Every run's steps are timed by the trainer's own step.train_step (forward and backward,
clipping, AdamW), the baseline's with its own forward and backward.

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

MFU counts useful FLOPs: 4 x the matmul parameters per token (run_metrics.flops_per_token: forward
2N and the input-gradient half of backward 2N; frozen weights get no weight gradient) plus
causal attention, 6 x layers x heads x head_dim x length^2 per sequence (run_metrics.attention_flops);
recomputation is not counted. Over the card's bf16 matmul rate measured in the same run (8192^3
products).
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainers import (  # noqa: E402  (trainers puts scripts/ on sys.path)
    ABLATIONS,
    TRAINER,
    Configuration,
    baseline_forward_backward,
    baseline_model,
    trainer_model,
)
from workloads import VARIANTS, largest, save_random_model, sequence_lengths, workloads_of  # noqa: E402

from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from modeling import peak_memory, reset_peak_memory  # noqa: E402
from run_metrics import attention_flops, bf16_matmul_tflops, flops_per_token  # noqa: E402
from step import StepOptions, Update, forward_backward, train_step  # noqa: E402


def measure(model, step_options, batches, steps, warmup, profile_to=None,
            forward_backward=forward_backward):
    """Median s/step, non-padding tokens/s, peak memory and the per-step losses, each step
    timed by step.train_step (AdamW at the default lr, gradients clipped at 1.0).

    `batches` are cycled: step i trains on batches[i % len(batches)], the same sequence for
    every run that is given the same list. Peak memory covers the training steps.
    """
    device = batches[0]["input_ids"].device
    update = Update(model, TRAINING_DEFAULTS)
    # each batch's attention FLOPs, read before the timed steps (reading them syncs the GPU)
    attention = [attention_flops(model.config, sequence_lengths(batch)) for batch in batches]
    reset_peak_memory(device)
    times, tokens, losses, first_step_s, attention_sum = [], [], [], None, 0
    for index in range(warmup + steps):
        result = train_step(model, [batches[index % len(batches)]], update, step_options,
                            forward_backward=forward_backward)
        losses.append(result.loss)
        if index == 0:  # includes torch.compile's compilation, when on
            first_step_s = result.seconds
        if index >= warmup:
            times.append(result.seconds)
            tokens.append(result.tokens)
            attention_sum += attention[index % len(batches)]
    peak_gb = peak_memory(device)["peak_memory_gb"]
    if profile_to:
        profile_step(model, batches[0], update, step_options, forward_backward, profile_to)
    return {"s_per_step": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "attention_flops_per_s": attention_sum / sum(times),
            "peak_gb": peak_gb, "losses": losses, "first_step_s": first_step_s,
            "spread": (max(times) - min(times)) / statistics.median(times)}


def mfu(result, flops_per_token, peak_tflops):
    """Useful FLOPs (matmuls and attention, no recomputation) per second over the card's rate."""
    return (result["tokens_per_s"] * flops_per_token + result["attention_flops_per_s"]) / (peak_tflops * 1e12)


def profile_step(model, batch, update, step_options, forward_backward, path):
    """The CUDA kernels of one training step, by total time: where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, [batch], update, step_options, forward_backward=forward_backward)
    Path(path).write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))


def release():
    """Free the GPU memory of models the caller has deleted."""
    gc.collect()
    torch.cuda.empty_cache()


def max_loss_difference(ours, base):
    return max(abs(a - b) for a, b in zip(ours["losses"], base["losses"]))


def run_variant(variant, args, peak_tflops):
    """All measurements of one variant: baseline and trainer per workload, then ablations."""
    hub_id, quantization = VARIANTS[variant]
    directory = str(args.models / hub_id.replace("/", "--"))
    save_random_model(hub_id, directory)
    rows, ablations = [], []
    # UltraChat first: none of its runs patch transformers (see ablation_order)
    for workload, batches_of in workloads_of(hub_id, args).items():
        def trainer_run(configuration, budget_gb, profile_name=None):
            return measure_trainer(directory, quantization, configuration, batches_of, budget_gb,
                                   args, peak_tflops, profile_name)

        label = f"{variant}-{workload}"
        model = baseline_model(directory, quantization)
        base = measure(model, StepOptions(), batches_of["padded"], args.steps, args.warmup,
                       args.profile and args.profile / f"{label}-baseline.txt",
                       forward_backward=baseline_forward_backward)
        del model
        release()
        print(f"{variant} {workload} baseline: {base['tokens_per_s']:.0f} tok/s, "
              f"{base['peak_gb']:.2f} GB", flush=True)
        ours = trainer_run(Configuration(), base["peak_gb"], f"{label}-trainer.txt")
        rows.append(comparison_row(variant, workload, args, ours, base, peak_tflops))
        print(json.dumps(rows[-1]), flush=True)
        for name, configuration in ablation_order({} if args.no_ablations else ABLATIONS[workload]):
            checkpointing = configuration.training.get("gradient_checkpointing")
            try:
                result = trainer_run(configuration, None if checkpointing is False else base["peak_gb"])
            except Exception as error:  # an option that fails here is reported, not fatal
                release()
                print(f"{variant} {workload} {name}: failed: {type(error).__name__}: {error}", flush=True)
                continue
            ablations.append(ablation_row(variant, workload, name, result, base))
            print(json.dumps(ablations[-1]), flush=True)
    return rows, ablations


def ablation_order(chosen):
    """Runs with Liger's module kernels (uncompiled, fused) go last: Liger patches
    transformers' modules for the rest of the process (speedups.apply_fused_kernels)."""
    def patches_transformers(configuration):
        return (configuration.training.get("compile") is False
                and configuration.training.get("fused_kernels") != "none")
    return sorted(chosen.items(), key=lambda item: patches_transformers(item[1]))


def measure_trainer(directory, quantization, configuration, batches_of, budget_gb, args,
                    peak_tflops, profile_name=None):
    """The trainer in `configuration` on its batches of the workload, measured."""
    if configuration.training.get("batch_tokens"):
        batches = batches_of["budget"]
    else:
        packing = configuration.training.get("packing", TRAINER["packing"])
        batches = batches_of["packed" if packing else "padded"]
    model, setup, memory = trainer_model(directory, quantization, configuration, largest(batches),
                                         budget_gb)
    flops = flops_per_token(model)
    result = measure(model, setup.step_options, batches, args.steps, args.warmup,
                     profile_name and args.profile and args.profile / profile_name)
    del model
    release()
    result.update(speed={**asdict(setup), **asdict(memory)}, mfu=mfu(result, flops, peak_tflops),
                  flops_per_token=flops)
    return result


def comparison_row(variant, workload, args, ours, base, peak_tflops):
    hub_id, quantization = VARIANTS[variant]
    return {
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


def ablation_row(variant, workload, name, result, base):
    return {
        "variant": variant, "workload": workload, "ablation": name,
        "tokens_per_s": result["tokens_per_s"], "s_per_step": result["s_per_step"],
        "peak_gb": result["peak_gb"], "mfu": result["mfu"],
        "speedup_vs_baseline": result["tokens_per_s"] / base["tokens_per_s"],
        "speed_options": result["speed"], "first_step_s": result["first_step_s"],
        "max_step_loss_difference": max_loss_difference(result, base),
    }


def main():
    args = parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.child:  # one variant, in a process of its own; rows go to OUT as JSON
        peak_tflops = json.loads(args.out.read_text())["bf16_matmul_tflops"]
        rows, ablations = run_variant(args.variants[0], args, peak_tflops)
        args.out.write_text(json.dumps({"rows": rows, "ablations": ablations}))
        return
    card = torch.cuda.get_device_name()
    peak_tflops = bf16_matmul_tflops(torch.device("cuda"))
    print(f"{card}: bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    result = result_header(card, peak_tflops)
    if args.out.exists():  # keep the other variants' rows measured on this card
        earlier = json.loads(args.out.read_text())
        if earlier.get("card") == card:
            for key in ("rows", "ablations"):
                result[key] = [r for r in earlier.get(key, []) if r["variant"] not in args.variants]
    for variant in args.variants:
        child_out = args.out.with_suffix(f".{variant}.part")
        child_out.write_text(json.dumps({"bf16_matmul_tflops": peak_tflops}))
        subprocess.run(child_command(args, variant, child_out), check=True)
        part = json.loads(child_out.read_text())
        child_out.unlink()
        result["rows"] += part["rows"]
        result["ablations"] += part["ablations"]
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each variant
    order = list(VARIANTS)
    result["rows"].sort(key=lambda r: (order.index(r["variant"]), r["workload"]))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)


def parse_args():
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
    return parser.parse_args()


def result_header(card, peak_tflops):
    return {
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


def child_command(args, variant, child_out):
    """This script, for one variant, in a process of its own."""
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
    return command


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
