"""Where one training step's time goes, CPU side and GPU side, for trainer variations.

    python bench/profile_step.py OUT_DIR [--variant v2] [--steps 5]

For each variation: wall-clock s/step, the GPU's kernel time in one profiled step (when it is far
below s/step the step is bound by the CPU launching work), the host-device synchronizations,
and the operators that cost the most CPU time. Every step is step.train_step, the trainer's
own. Writes OUT_DIR/profile.json and one table per variation.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import release  # noqa: E402
from trainers import Configuration, trainer_model  # noqa: E402  (puts scripts/ on sys.path)
from workloads import KNOWN_ARCHITECTURES, VARIANTS, fixed_batches, save_random_model  # noqa: E402

from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from speedups import TrainerOptions  # noqa: E402
from step import Update, train_step  # noqa: E402

# Liger's layer kernels patch transformers for the rest of the process (see bench/speed.py):
# the variations without them come first.
VARIATIONS = {
    "trainer (compiled), all layers checkpointed": Configuration({"gradient_checkpointing": True}),
    "no fused kernels, not compiled": Configuration(
        {"gradient_checkpointing": True, "fused_kernels": "none", "compile": False}),
    "trainer not compiled (Liger's layer kernels), all layers checkpointed": Configuration(
        {"gradient_checkpointing": True, "compile": False}),
    "not compiled, no autocast (float32 adapters, peft's casts)": Configuration(
        {"gradient_checkpointing": True, "compile": False}, TrainerOptions(bf16_autocast=False)),
    "not compiled, padded batch (SDPA, no varlen)": Configuration(
        {"gradient_checkpointing": True, "packing": False, "compile": False}),
}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def profile_variation(name, configuration, directory, quantization, batches, args):
    batch = batches[1] if configuration.training.get("packing", True) else batches[0]
    model, setup, _ = trainer_model(directory, quantization, configuration, batch, None)
    update = Update(model, TRAINING_DEFAULTS)
    steps = [train_step(model, [batch], update, setup.step_options) for _ in range(3 + args.steps)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, [batch], update, setup.step_options)
    events = prof.key_averages()
    # kernels only: an operator's device time repeats the time of the kernels it launched
    gpu_ms = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    syncs = {e.key: e.count for e in events if e.key in SYNCS}
    table = events.table(sort_by="self_cpu_time_total", row_limit=40)
    (args.out / f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}.txt").write_text(table)
    del model, update
    release()
    result = {"variation": name, "s_per_step": statistics.median(s.seconds for s in steps[3:]),
              "gpu_kernel_ms": gpu_ms, "syncs": syncs}
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="v2", choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hub_id, quantization = VARIANTS[args.variant]
    directory = str(args.models / hub_id.replace("/", "--"))
    save_random_model(hub_id, directory)
    batches = fixed_batches(KNOWN_ARCHITECTURES[hub_id]["vocab_size"], 4, 1024)
    results = [profile_variation(name, configuration, directory, quantization,
                                 (batches["padded"][0], batches["packed"][0]), args)
               for name, configuration in VARIATIONS.items()]
    (args.out / "profile.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"{r['s_per_step']:.3f} s/step  GPU {r['gpu_kernel_ms']:.0f} ms  syncs {r['syncs']}  "
              f"{r['variation']}")


if __name__ == "__main__":
    main()
