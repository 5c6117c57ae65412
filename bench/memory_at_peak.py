"""What is in GPU memory at the trainer's peak: the allocations live at that moment, by where in
the code they were made.

    python bench/memory_at_peak.py OUT.txt [--variant v2] [--budget-gb 8.994] [--ultrachat FILE]

The trainer is set up as bench/speed.py sets it up (the same batches, the same memory budget),
then torch's allocator records every allocation and free of a few training steps
(torch.cuda.memory._record_memory_history). Replaying that record finds the moment of the
highest allocation above what was allocated before the steps (the model), and the blocks live
then are summed by the code that allocated them: what a lower memory floor has to remove.
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import model_directory  # noqa: E402
from trainers import Configuration, trainer_model  # noqa: E402  (puts scripts/ on sys.path)
from workloads import KNOWN_ARCHITECTURES, VARIANTS, largest, save_random_model, workloads_of  # noqa: E402

from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from step import Update, train_step  # noqa: E402

# Frames of these files say nothing about which tensor it is.
PLUMBING = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/_dynamo/",
            "torch/_tensor.py", "torch/autograd/", "torch/overrides.py", "torch/_ops.py")


def allocation_site(frames, depth=3):
    """The innermost `depth` frames outside torch's plumbing, as 'file:line name' joined."""
    kept = [f for f in frames if not any(p in f["filename"] for p in PLUMBING)]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in kept[:depth]) or "?"


def live_at_peak(trace):
    """Replays one device's allocator trace: (peak bytes above the start, {address: (size,
    frames)} live at that moment). Blocks allocated before the trace started are not in it."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    return peak, at_peak


def by_site(blocks):
    sums = defaultdict(lambda: [0, 0])
    for size, frames in blocks.values():
        site = sums[allocation_site(frames)]
        site[0] += size
        site[1] += 1
    return sorted(sums.items(), key=lambda item: -item[1][0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="v2", choices=list(VARIANTS))
    parser.add_argument("--budget-gb", type=float, default=None)
    parser.add_argument("--workload", default="fixed", choices=["fixed", "ultrachat"])
    parser.add_argument("--ultrachat", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    args = parser.parse_args()
    hub_id, quantization = VARIANTS[args.variant]
    directory = model_directory(args, args.variant)
    save_random_model(hub_id, directory)
    batches_of = workloads_of(KNOWN_ARCHITECTURES[hub_id]["vocab_size"], args)[args.workload]
    batches = batches_of["packed"]
    model, setup, memory = trainer_model(directory, quantization, Configuration(), largest(batches),
                                         args.budget_gb)
    update = Update(model, TRAINING_DEFAULTS)
    train_step(model, [batches[0]], update, setup.step_options)  # compiles; not recorded
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    for index in range(args.steps):
        train_step(model, [batches[(index + 1) % len(batches)]], update, setup.step_options)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak, blocks = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
    lines = [f"{args.variant} {args.workload}, budget {args.budget_gb} GB, plan {memory}",
             f"allocated before the steps: {before / 1e9:.3f} GB; max_memory_allocated over the "
             f"steps: {torch.cuda.max_memory_allocated() / 1e9:.3f} GB; replayed peak above the "
             f"start: {peak / 1e9:.3f} GB in {len(blocks)} blocks", "",
             f"{'MB':>9} {'blocks':>6}  allocated at (innermost first)"]
    lines += [f"{size / 1e6:9.1f} {count:6d}  {site}" for site, (size, count) in by_site(blocks)[:40]]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
