"""Padded training steps on a CPU with and without the padding mask (batches.model_inputs leaves
it out: with right padding the losses and gradients are the same, tests/test_train_loss.py).

A training step's forward and backward as the trainer runs them on a CPU (logits at the
labelled positions only: step.target_token_losses), on the embedded default's two tiny models
(config.yaml; random weights: speed does not depend on them), LoRA as config.yaml sets it,
padded batches of the default's batch size of the bundled sample's real conversations
(cpu_packing.bundled_examples). The model gets batches.model_inputs(batch), or that plus the
batch's attention_mask. Both ways alternate step by step on the same batches, so that a machine
shared with other work slows both alike; the ratio is of the two medians, from one run.

    python bench/cpu_padding_mask.py OUT.json [--steps 30] [--threads 1]
"""

import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_packing import alternating_bench_main  # noqa: E402  (puts scripts/ on sys.path)

from batches import collate, model_inputs, shifted_targets  # noqa: E402
from chat_format import IGNORE_INDEX  # noqa: E402
from speedups import attach_lora  # noqa: E402

MODES = {
    "without the mask": lambda batch: model_inputs(batch),
    "with the mask": lambda batch: {**model_inputs(batch), "attention_mask": batch["attention_mask"]},
}


def step_seconds(model, batch, inputs):
    """Seconds of one forward and backward as step.target_token_losses runs them, given the
    model's inputs; and the loss."""
    started = time.perf_counter()
    causal_lm = model.get_base_model()
    hidden = getattr(causal_lm, causal_lm.base_model_prefix)(**inputs).last_hidden_state
    targets = shifted_targets(batch["labels"])
    mask = targets != IGNORE_INDEX
    loss = F.cross_entropy(causal_lm.get_output_embeddings()(hidden[mask]).float(), targets[mask])
    loss.backward()
    seconds = time.perf_counter() - started
    model.zero_grad(set_to_none=True)
    return seconds, loss.item()


def measure(name, model, lora, examples, batch_size, steps, warmup=3):
    model = attach_lora(model, lora, gradient_checkpointing=False)
    model.train()
    rng = random.Random(0)
    seconds = {mode: [] for mode in MODES}
    largest_loss_difference = padding = positions = 0
    for index in range(steps + warmup):
        batch = collate(rng.sample(examples, batch_size), 0, torch.device("cpu"))
        losses = []
        for mode, inputs in MODES.items():
            step, loss = step_seconds(model, batch, inputs(batch))
            losses.append(loss)
            if index >= warmup:
                seconds[mode].append(step)
        largest_loss_difference = max(largest_loss_difference, abs(losses[0] - losses[1]))
        padding += int((batch["attention_mask"] == 0).sum())
        positions += batch["attention_mask"].numel()
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    row = {"model": name, "batch_size": batch_size, "padding_share": padding / positions,
           **{f"median_s_per_step, {mode}": value for mode, value in median.items()},
           "without_over_with": median["without the mask"] / median["with the mask"],
           "largest_loss_difference": largest_loss_difference}
    print(f"{name}: {100 * row['padding_share']:.0f}% of the positions are padding; with the mask "
          f"{median['with the mask'] * 1000:.0f} ms/step, without {median['without the mask'] * 1000:.0f} "
          f"ms/step ({row['without_over_with']:.2f}x); losses differ by at most "
          f"{largest_loss_difference:.1e}", flush=True)
    return row


if __name__ == "__main__":
    alternating_bench_main(__doc__.splitlines()[0], measure)
