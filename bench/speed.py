"""Training speed and memory: the pipeline's trainer next to the tools a user would pick instead.

All run on the same GPU in one call, for the seed's three variants (Qwen3-4B nf4, Qwen3-4B
bf16, Llama-2-7b nf4), with random weights of the real architectures (speed does not depend on
the weights), LoRA r=1 on the 7 projection matrices, AdamW, the same batches
(bench/workloads.py).

- peers (bench/peers.py): a plain transformers + peft (+ bitsandbytes) script; the same with
  Liger's kernels; Unsloth. Each in a process of its own (Liger and Unsloth patch transformers),
  on padded batches.
- trainer: the pipeline's own set-up and step with the default speed options, once per memory
  budget: `memory_budget_gb` set to the measured peak of each peer named by --budgets-of (default
  liger and unsloth). A row compares a peer with the trainer run of the largest budget within
  that peer's peak, so the trainer never gets more memory than the peer it is compared with.
- ablations: the trainer with one option changed, within the plain script's peak
  (bench/trainers.py).

Every run's steps are timed by the trainer's own step.train_step (forward and backward,
clipping, AdamW), each peer's with its own forward and backward. Peak memory: the GPU's peak
allocation over the warm-up and timed steps, after the model is loaded and before anything else
(the same window for every run). Tokens/s: the mean non-padding tokens per step over the median
step time, so one slow step does not move it; runs on the same batches compare by their median
step times.

Workloads: `fixed` is 4 x 1024 random tokens, every token a target, no padding. With
--ultrachat FILE.jsonl, `ultrachat` uses real UltraChat conversation lengths (characters / 4,
capped at 1024 like the pipeline's max_length): padded batches for the peers, packed ones of
the same conversations for the trainer.

    python bench/speed.py OUT.json [--variants v1 v2 v3] [--peers plain liger unsloth]
                                   [--ultrachat FILE] [--profile DIR] [--no-ablations]

Rows of variants not run now are kept from an existing OUT.json of the same card.

MFU counts useful FLOPs: 4 x the matmul parameters per token (run_metrics.flops_per_token: forward
2N and the input-gradient half of backward 2N; frozen weights get no weight gradient) plus
causal attention, 6 x layers x heads x head_dim x length^2 per sequence (run_metrics.attention_flops);
recomputation is not counted. Over the card's bf16 matmul rate measured in the same run (8192^3
products).
"""

import sys

# A peer that patches transformers as it is imported (Unsloth) is imported before anything else
# in its process (bench/peers.py: Peer.first_import).
if "--first-import" in sys.argv:
    __import__(sys.argv[sys.argv.index("--first-import") + 1])

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import PEERS  # noqa: E402  (peers and trainers put scripts/ on sys.path)
from trainers import ABLATIONS, TRAINER, Configuration, trainer_model  # noqa: E402
from workloads import (  # noqa: E402
    KNOWN_ARCHITECTURES,
    VARIANTS,
    largest,
    save_random_model,
    sequence_lengths,
    workloads_of,
)

from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from modeling import peak_memory, reset_peak_memory  # noqa: E402
from run_metrics import attention_flops, bf16_matmul_tflops, flops_per_token  # noqa: E402
from step import StepOptions, Update, forward_backward, train_step  # noqa: E402

# The goals: the trainer's tokens/s over each peer's, within that peer's peak memory.
GOALS = {"unsloth": 1.2, "liger": 2.0}


def measure(model, step_options, batches, steps, warmup, profile_to=None,
            forward_backward=forward_backward):
    """Median s/step, tokens/s, peak memory and the per-step losses, each step timed by
    step.train_step (AdamW at the default lr, gradients clipped at 1.0).

    `batches` are cycled: step i trains on batches[i % len(batches)], the same sequence for
    every run that is given the same list. Peak memory covers the warm-up and timed steps
    (reset after loading). Tokens/s is the mean non-padding tokens per timed step over the
    median step time.
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
    peak_gb = peak_memory(device)["peak_memory_gb"] if device.type == "cuda" else None
    if profile_to:
        profile_step(model, batches[0], update, step_options, forward_backward, profile_to)
    median_s = statistics.median(times)
    return {"s_per_step": median_s, "tokens_per_s": statistics.mean(tokens) / median_s,
            "mean_tokens_per_s": sum(tokens) / sum(times),
            "attention_flops_per_s": attention_sum / len(times) / median_s,
            "peak_gb": peak_gb, "losses": losses, "first_step_s": first_step_s,
            "spread": (max(times) - min(times)) / median_s}


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


def measure_peer(peer, directory, quantization, workloads, args, device="cuda", label=""):
    """One peer on every workload (its padded batches), loaded once: {workload: result}, or
    {"skipped": why} where it cannot run here."""
    reason = peer.unavailable(device)
    if reason:
        print(f"{label} {peer.name}: skipped: {reason}", flush=True)
        return {"skipped": reason}
    results = {}
    try:
        model = peer.load(directory, quantization, args.seq_len, device)
        for workload, batches_of in workloads.items():
            profile_to = args.profile and args.profile / f"{label}-{workload}-{peer.name}.txt"
            results[workload] = measure(model, StepOptions(), batches_of["padded"], args.steps,
                                        args.warmup, profile_to, forward_backward=peer.forward_backward)
            print(f"{label} {workload} {peer.name}: {results[workload]['tokens_per_s']:.0f} tok/s, "
                  f"{results[workload]['peak_gb']} GB", flush=True)
    except Exception as error:  # a peer that fails on this machine is reported with its error
        traceback.print_exc()
        return {"skipped": f"failed: {type(error).__name__}: {error}"[:1000]}
    del model
    release()
    return results


def measure_trainer(directory, quantization, configuration, batches_of, budget_gb, args,
                    profile_name=None, device="cuda"):
    """The trainer in `configuration` on its batches of the workload, within `budget_gb`."""
    if configuration.training.get("batch_tokens"):
        batches = batches_of["budget"]
    else:
        packing = configuration.training.get("packing", TRAINER["packing"])
        batches = batches_of["packed" if packing else "padded"]
    model, setup, memory = trainer_model(directory, quantization, configuration, largest(batches),
                                         budget_gb, device)
    flops = flops_per_token(model)
    result = measure(model, setup.step_options, batches, args.steps, args.warmup,
                     profile_name and args.profile and args.profile / profile_name)
    del model
    release()
    result.update(speed={**asdict(setup), **asdict(memory)}, flops_per_token=flops,
                  memory_budget_gb=budget_gb)
    return result


def trainer_budgets(peer_results, budget_peers):
    """{workload: sorted peak GB of the peers in `budget_peers` that ran}: the memory budgets
    the trainer runs with (rounded down to the MB, so never above the peak)."""
    budgets = {}
    for name in budget_peers:
        for workload, result in peer_results.get(name, {}).items():
            if workload != "skipped":
                budgets.setdefault(workload, set()).add(math.floor(result["peak_gb"] * 1000) / 1000)
    return {workload: sorted(values) for workload, values in budgets.items()}


def run_trainer(directory, quantization, workloads, budgets, plain_peaks, args, device="cuda",
                label=""):
    """The trainer on every workload at each of its budgets, then the ablations within the
    plain script's peak: ({workload: {budget: result}}, [ablation results])."""
    runs, ablations = {}, []
    for workload, batches_of in workloads.items():
        runs[workload] = {}
        for budget in budgets.get(workload, [None]):
            profile_name = f"{label}-{workload}-trainer-{budget}GB.txt"
            result = measure_trainer(directory, quantization, Configuration(), batches_of, budget,
                                     args, profile_name, device)
            runs[workload][str(budget)] = result
            print(f"{label} {workload} trainer within {budget} GB: {result['tokens_per_s']:.0f} "
                  f"tok/s, {result['peak_gb']} GB", flush=True)
        for name, configuration in ablation_order({} if args.no_ablations else ABLATIONS[workload]):
            checkpointing = configuration.training.get("gradient_checkpointing")
            budget = None if checkpointing is False else plain_peaks.get(workload)
            try:
                result = measure_trainer(directory, quantization, configuration, batches_of,
                                         budget, args, device=device)
            except Exception as error:  # an option that fails here is reported, not fatal
                release()
                print(f"{label} {workload} {name}: failed: {type(error).__name__}: {error}", flush=True)
                continue
            ablations.append({"workload": workload, "ablation": name, **result})
    return runs, ablations


def ablation_order(chosen):
    """Runs with Liger's module kernels (uncompiled, fused) go last: Liger patches
    transformers' modules for the rest of the process (speedups.apply_fused_kernels)."""
    def patches_transformers(configuration):
        return (configuration.training.get("compile") is False
                and configuration.training.get("fused_kernels") != "none")
    return sorted(chosen.items(), key=lambda item: patches_transformers(item[1]))


def trainer_run_for(peer_peak_gb, runs):
    """The trainer run a peer is compared with: the largest budget within the peer's peak (the
    smallest budget where none is)."""
    budgets = sorted(runs, key=lambda budget: float(budget) if budget != "None" else float("inf"))
    within = [b for b in budgets if b != "None" and peer_peak_gb is not None
              and float(b) <= peer_peak_gb + 1e-9]
    return runs[within[-1] if within else budgets[0]]


def comparison_rows(variant, args, peer_results, trainer_runs, peak_tflops):
    """One row per workload and peer that ran: the trainer (within the peer's peak memory) vs
    the peer, on the same batches."""
    hub_id, quantization = VARIANTS[variant]
    rows = []
    for workload, runs in trainer_runs.items():
        for name, results in peer_results.items():
            if "skipped" in results:
                continue
            peer, ours = results[workload], trainer_run_for(results[workload]["peak_gb"], runs)
            speedup = ours["tokens_per_s"] / peer["tokens_per_s"]
            # peak memory is the GPU's (a CPU run has none to compare)
            within = None if peer["peak_gb"] is None else ours["peak_gb"] <= peer["peak_gb"]
            goal = GOALS.get(name)
            rows.append({
                "variant": variant, "model": hub_id, "quantization": quantization,
                "workload": workload, "batch": args.batch, "seq_len": args.seq_len,
                "peer": name, "peer_description": PEERS[name].description,
                "memory_budget_gb": ours["memory_budget_gb"],
                "tokens_per_s": ours["tokens_per_s"], "peer_tokens_per_s": peer["tokens_per_s"],
                "speedup_vs_peer": speedup,
                "s_per_step": ours["s_per_step"], "peer_s_per_step": peer["s_per_step"],
                "peak_gb": ours["peak_gb"], "peer_peak_gb": peer["peak_gb"],
                "within_peer_memory": within,
                "goal_speedup": goal,
                "goal_met": None if goal is None or within is None else (speedup >= goal and within),
                "mfu": mfu(ours, ours["flops_per_token"], peak_tflops), "bf16_matmul_tflops": peak_tflops,
                "peer_mfu": mfu(peer, ours["flops_per_token"], peak_tflops),
                "mean_tokens_per_s": ours["mean_tokens_per_s"],
                "peer_mean_tokens_per_s": peer["mean_tokens_per_s"],
                "speed_options": ours["speed"],
                "mean_loss": statistics.mean(ours["losses"]),
                "peer_mean_loss": statistics.mean(peer["losses"]),
                "max_step_loss_difference": max_loss_difference(ours, peer),
                "timing_spread": ours["spread"], "peer_timing_spread": peer["spread"],
                "first_step_s": ours["first_step_s"], "peer_first_step_s": peer["first_step_s"],
            })
    return rows


def ablation_rows(variant, ablations, plain_results, peak_tflops):
    return [{
        "variant": variant, "workload": a["workload"], "ablation": a["ablation"],
        "memory_budget_gb": a["memory_budget_gb"],
        "tokens_per_s": a["tokens_per_s"], "s_per_step": a["s_per_step"],
        "peak_gb": a["peak_gb"], "mfu": mfu(a, a["flops_per_token"], peak_tflops),
        "speedup_vs_plain": a["tokens_per_s"] / plain_results[a["workload"]]["tokens_per_s"],
        "speed_options": a["speed"], "first_step_s": a["first_step_s"],
        "max_step_loss_difference": max_loss_difference(a, plain_results[a["workload"]]),
    } for a in ablations]


def skipped_peers(variant, peer_results):
    return [{"variant": variant, "peer": name, "reason": results["skipped"]}
            for name, results in peer_results.items() if "skipped" in results]


def run_variant(variant, args, peak_tflops):
    """Every peer of one variant, each in a process of its own, then the trainer in another:
    (rows, ablations, skipped peers)."""
    hub_id, _ = VARIANTS[variant]
    save_random_model(hub_id, model_directory(args, variant))
    peer_results = {}
    for name in args.peers:
        peer_results[name] = run_child(args, variant, ["--peer", name], PEERS[name].first_import)
    budgets = trainer_budgets(peer_results, args.budgets_of)
    plain = peer_results.get("plain", {})
    plain_peaks = {w: r["peak_gb"] for w, r in plain.items() if w != "skipped"}
    trainer = run_child(args, variant, ["--budgets", json.dumps(budgets),
                                        "--plain-peaks", json.dumps(plain_peaks)])
    if "skipped" in trainer:
        return [], [], skipped_peers(variant, {**peer_results, "trainer": trainer})
    rows = comparison_rows(variant, args, peer_results, trainer["runs"], peak_tflops)
    ablations = ablation_rows(variant, trainer["ablations"], plain, peak_tflops) if plain_peaks else []
    return rows, ablations, skipped_peers(variant, peer_results)


def model_directory(args, variant):
    return str(args.models / VARIANTS[variant][0].replace("/", "--"))


def child(args):
    """One peer, or the trainer at its budgets, for one variant, in this process; the result
    goes to OUT as JSON."""
    variant = args.variants[0]
    hub_id, quantization = VARIANTS[variant]
    directory = model_directory(args, variant)
    workloads = workloads_of(KNOWN_ARCHITECTURES[hub_id]["vocab_size"], args)
    if args.peer:
        result = measure_peer(PEERS[args.peer], directory, quantization, workloads, args, label=variant)
    else:
        runs, ablations = run_trainer(directory, quantization, workloads, json.loads(args.budgets),
                                      json.loads(args.plain_peaks), args, label=variant)
        result = {"runs": runs, "ablations": ablations}
    args.out.write_text(json.dumps(result))


def run_child(args, variant, role, first_import=None):
    """This script for one variant and `role` in a process of its own; its JSON result."""
    child_out = args.out.with_suffix(f".{variant}.part")
    command = [sys.executable, __file__, str(child_out), "--child", "--variants", variant,
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--models", str(args.models), *role]
    if first_import:
        command += ["--first-import", first_import]
    if args.no_ablations:
        command.append("--no-ablations")
    if args.ultrachat and not args.fixed_only:
        command += ["--ultrachat", str(args.ultrachat)]
    if args.profile:
        command += ["--profile", str(args.profile)]
    started = time.monotonic()
    try:
        completed = subprocess.run(command, timeout=args.child_timeout)
        print(f"[{variant} {' '.join(role[:2])[:40]}: {time.monotonic() - started:.0f} s]", flush=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"its process ran past {args.child_timeout} s and was stopped"}
    if completed.returncode != 0 or not child_out.exists():
        # A peer that fails on this machine is reported as such; the log above has its error.
        return {"skipped": f"its process failed (exit status {completed.returncode}); see the log"}
    result = json.loads(child_out.read_text())
    child_out.unlink()
    return result


def main():
    args = parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    if args.child:
        child(args)
        return
    card = torch.cuda.get_device_name()
    peak_tflops = bf16_matmul_tflops(torch.device("cuda"))
    print(f"{card}: bf16 matmul {peak_tflops:.0f} TFLOP/s", flush=True)
    result = result_header(card, peak_tflops)
    if args.out.exists():  # keep the other variants' rows measured on this card
        earlier = json.loads(args.out.read_text())
        if earlier.get("card") == card:
            for key in ("rows", "ablations", "skipped_peers"):
                result[key] = [r for r in earlier.get(key, []) if r["variant"] not in args.variants]
    for variant in args.variants:
        rows, ablations, skipped = run_variant(variant, args, peak_tflops)
        result["rows"] += rows
        result["ablations"] += ablations
        result["skipped_peers"] += skipped
        write_result(args.out, result)  # after each variant
    print_table(result)


def write_result(path, result):
    order, peers = list(VARIANTS), list(PEERS)
    result["rows"].sort(key=lambda r: (order.index(r["variant"]), r["workload"], peers.index(r["peer"])))
    path.write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--budgets-of", nargs="+", default=["liger", "unsloth"], choices=list(PEERS),
                        help="the peers whose peak memory the trainer runs within")
    parser.add_argument("--fixed-only", action="store_true", help="skip the UltraChat workload")
    parser.add_argument("--no-ablations", action="store_true", help="peers and trainer only")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--ultrachat", type=Path, default=None,
                        help="an ultrachat_200k-format .jsonl: adds the variable-length workload")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a directory: write one profiled step's kernel table per run there")
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    parser.add_argument("--child-timeout", type=float, default=600,
                        help="seconds one peer's or the trainer's process may take")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer", choices=list(PEERS), help=argparse.SUPPRESS)
    parser.add_argument("--budgets", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--plain-peaks", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--first-import", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def result_header(card, peak_tflops):
    return {
        "card": card,
        "bf16_matmul_tflops": peak_tflops,
        "versions": {package: _version(package) for package in
                     ("torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "unsloth",
                      "unsloth_zoo")},
        "peak_memory": "torch.cuda.max_memory_allocated over the warm-up and timed steps, reset "
                       "after the model is loaded; the same window for every run",
        "tokens_per_s": "mean non-padding tokens per timed step / median step time",
        "flops_per_token": "4 x matmul parameters (forward + input-gradient backward; "
                           "no recomputation) + causal attention 6 x layers x heads x head_dim x "
                           "length^2 per sequence (forward + backward)",
        "goals": {peer: f">= {goal}x the peer's tokens/s within its peak memory"
                  for peer, goal in GOALS.items()},
        "trainer_defaults": TRAINER,
        "rows": [],
        "ablations": [],
        "skipped_peers": [],
    }


def print_table(result):
    print(f"\n{result['card']}, bf16 matmul {result['bf16_matmul_tflops']:.0f} TFLOP/s")
    print(f"{'variant':8}{'workload':11}{'peer':9}{'tok/s':>9}{'peer tok/s':>12}{'speedup':>9}"
          f"{'peak GB':>9}{'peer GB':>9}{'MFU':>7}{'goal':>6}{'loss diff':>11}")
    for r in result["rows"]:
        goal = "" if r["goal_met"] is None else ("met" if r["goal_met"] else "MISS")
        print(f"{r['variant']:8}{r['workload']:11}{r['peer']:9}{r['tokens_per_s']:9.0f}"
              f"{r['peer_tokens_per_s']:12.0f}{r['speedup_vs_peer']:9.2f}{r['peak_gb']:9.2f}"
              f"{r['peer_peak_gb']:9.2f}{r['mfu']:7.1%}{goal:>6}{r['max_step_loss_difference']:11.4f}")
    for a in result["ablations"]:
        print(f"  {a['variant']} {a['workload']:10} {a['tokens_per_s']:7.0f} tok/s "
              f"{a['speedup_vs_plain']:5.2f}x {a['peak_gb']:6.1f} GB  {a['ablation']}")
    for s in result["skipped_peers"]:
        print(f"  {s['variant']} {s['peer']}: not measured: {s['reason']}")


def _version(package):
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
