"""Logits at the labelled positions only vs at every position, training steps on a CPU
(StepOptions.target_logits, on wherever the loss is not fused: speedups.decide_speedups).

The trainer's own step (step.train_step) on the embedded default's two tiny models (config.yaml;
random weights: speed does not depend on them), LoRA as config.yaml sets it, padded batches of
the default's batch size of the bundled sample's real conversations (cpu_packing.bundled_examples:
prompt tokens unlabelled, as the pipeline tokenizes them).
Both ways alternate step by step on the same batches, so that a machine shared with other work
slows both alike; the ratio is of the two medians, from one run.

    python bench/cpu_target_logits.py OUT.json [--steps 30] [--threads 1]
"""

import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_packing import alternating_bench_main  # noqa: E402  (puts scripts/ on sys.path)

from batches import collate  # noqa: E402
from chat_format import IGNORE_INDEX  # noqa: E402
from experiment_config import TRAINING_DEFAULTS  # noqa: E402
from speedups import attach_lora  # noqa: E402
from step import StepOptions, Update, train_step  # noqa: E402

MODES = {"every position": StepOptions(target_logits=False),
         "labelled positions only": StepOptions(target_logits=True)}


def measure(name, model, lora, examples, batch_size, steps, warmup=3):
    model = attach_lora(model, lora, gradient_checkpointing=False)
    model.train()
    rng = random.Random(0)
    update = Update(model, {**TRAINING_DEFAULTS, "lr": 1e-3, "steps": steps + warmup})
    seconds = {mode: [] for mode in MODES}
    positions = targets = 0
    for index in range(steps + warmup):
        batch = collate(rng.sample(examples, batch_size), 0, torch.device("cpu"))
        for mode, options in MODES.items():
            result = train_step(model, [batch], update, options)
            if index >= warmup:
                seconds[mode].append(result.seconds)
        positions += batch["labels"].numel()
        targets += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    row = {"model": name, "batch_size": batch_size, "target_share": targets / positions,
           **{f"median_s_per_step, logits at {mode}": value for mode, value in median.items()},
           "labelled_only_over_every": median["labelled positions only"] / median["every position"]}
    print(f"{name}: {100 * row['target_share']:.0f}% of the positions are targets; logits at every "
          f"position {median['every position'] * 1000:.0f} ms/step, at the labelled ones "
          f"{median['labelled positions only'] * 1000:.0f} ms/step "
          f"({row['labelled_only_over_every']:.2f}x)", flush=True)
    return row


if __name__ == "__main__":
    alternating_bench_main(__doc__.splitlines()[0], measure)
