"""Where one training step's time goes, CPU side and GPU side, for trainer variations.

    python bench/profile_step.py OUT_DIR [--variant v2] [--steps 5]

For each variation: wall-clock s/step, the GPU's kernel time in one profiled step (when it is far
below s/step the step is bound by the CPU launching work), the host-device synchronizations,
and the operators that cost the most CPU time. Writes OUT_DIR/profile.json and one table per
variation.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402
import train  # noqa: E402  (speed put scripts/ on sys.path)

# name -> (trainer options, patches of train's functions)
# Liger's layer kernels patch transformers for the rest of the process (see bench/speed.py):
# the variations without them come first.
VARIATIONS = {
    "trainer (compiled), all layers checkpointed": ({"gradient_checkpointing": True}, {}),
    "no fused kernels, not compiled": (
        {"gradient_checkpointing": True, "fused_kernels": "none", "compile": False}, {}),
    "trainer not compiled (Liger's layer kernels), all layers checkpointed": (
        {"gradient_checkpointing": True, "compile": False}, {}),
    "not compiled, no autocast (float32 adapters, peft's casts)": (
        {"gradient_checkpointing": True, "compile": False},
        {"lora_mixed_precision": lambda device: contextlib.nullcontext(),
         "keep_adapter_inputs_bf16": lambda model: None},
    ),
    "not compiled, padded batch (SDPA, no varlen)": (
        {"gradient_checkpointing": True, "packing": False, "compile": False}, {}),
}
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize")


def profile_variation(name, options, patches, directory, quantization, batches, args):
    saved = {key: getattr(train, key) for key in patches}
    for key, value in patches.items():
        setattr(train, key, value)
    batch = batches[1] if options.get("packing", True) else batches[0]
    model, step, _ = speed.trainer_model(directory, quantization, options, batch, None)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for index in range(3 + args.steps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        step(batch)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= 3:
            times.append(time.perf_counter() - started)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: an operator's device time repeats the time of the kernels it launched
    gpu_ms = sum(e.self_device_time_total for e in events
                 if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    syncs = {e.key: e.count for e in events if e.key in SYNCS}
    table = events.table(sort_by="self_cpu_time_total", row_limit=40)
    (args.out / f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}.txt").write_text(table)
    for key, value in saved.items():
        setattr(train, key, value)
    del model, step, params
    speed.release()
    result = {"variation": name, "s_per_step": statistics.median(times), "gpu_kernel_ms": gpu_ms,
              "syncs": syncs}
    print(json.dumps(result), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", default="v2", choices=list(speed.VARIANTS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--models", type=Path, default=Path("/tmp/loranotes-bench-models"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hub_id, quantization = speed.VARIANTS[args.variant]
    directory = str(args.models / hub_id.replace("/", "--"))
    speed.save_random_model(hub_id, directory)
    batches = speed.fixed_batches(speed.KNOWN_ARCHITECTURES[hub_id]["vocab_size"], 4, 1024)
    results = [profile_variation(name, options, patches, directory, quantization,
                                 (batches["padded"][0], batches["packed"][0]), args)
               for name, (options, patches) in VARIATIONS.items()]
    (args.out / "profile.json").write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"{r['s_per_step']:.3f} s/step  GPU {r['gpu_kernel_ms']:.0f} ms  syncs {r['syncs']}  "
              f"{r['variation']}")


if __name__ == "__main__":
    main()
