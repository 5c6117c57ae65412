"""Train one run of a variant (one seed): LoRA on a base model (nf4 or not), loss on assistant tokens only.

Reads the tokenized splits, writes the adapter (safetensors), a per-step CSV and a metrics JSON.
`train` is the recipe, read top to bottom:
- load: the data (batches.py) and the model with its speed features and LoRA (speedups.py);
- plan: how much backward recomputes to fit the memory budget (memory_plan.py);
- resume: the latest checkpoint of this very run, or the eval before training (resume.py);
- loop: one step after the other (step.py), the held-out split evaluated every `eval_every`
  steps and at the last (the eval after training), checkpointed every `checkpoint_every` steps;
- write: the adapter, train_log.csv and metrics.json (run_metrics.py), with the run's
  provenance (provenance.py).
With `training.devices` N > 1, main() hands the job to torchrun, which runs `train` on N ranks
(distributed.py): each rank trains on its share of every batch, rank 0 logs and writes.
"""

import contextlib
import datetime
import functools
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from batches import batches_forever, collate, largest_share, pack, read_tokenized
from distributed import ONE_PROCESS, Ranks, align_ranks, finish, launch, start
from errors import configure_logging, entry_point
from graceful_stop import StopOnSignal
from outputs import with_umask
from memory_plan import MemoryPlan, out_of_memory, plan_memory
from provenance import run_provenance
from model_sources import model_info, weights_phrase
from modeling import load_tokenizer, peak_memory, pick_device, reset_peak_memory
from resume import checkpoint_due, remove_checkpoints, resume, run_fingerprint, save_checkpoint
from run_metrics import (
    attention_flops,
    bf16_matmul_tflops,
    flops_per_token,
    step_record,
    summarize,
    write_metrics,
    write_train_log,
)
from speedups import Speedups, TrainerOptions, load_for_training
from step import BatchOutOfMemory, LossNotFinite, TrainingError, Update, evaluate, train_step
from trackers import Trackers, open_trackers

log = logging.getLogger("loranotes.train")


@dataclass
class Run:
    """One variant's training as `load` sets it up and `plan` completes it."""
    training: dict
    quantization: str
    device: torch.device
    model: torch.nn.Module
    setup: Speedups
    make_batch: Callable  # a list of (input_ids, labels) -> a batch on the device
    train_examples: list
    eval_examples: list
    pad_id: int
    ranks: Ranks = ONE_PROCESS  # data-parallel: this process's rank among training.devices
    memory: MemoryPlan | None = None
    bf16_matmul_tflops: float | None = None  # MFU's denominator, measured before training

    def evaluate(self):
        return evaluate(self.model, self.eval_examples, self.training["eval_batch_size"],
                        self.pad_id, self.device, autocast=self.setup.bf16_autocast,
                        ranks=self.ranks, target_logits=self.setup.target_logits)


def train(model_path, quantization, train_path, eval_path, training, lora, out_dir,
          trust_remote_code=False, checkpoint_dir=None, options=TrainerOptions(), trackers=None):
    """Train one run; returns its metrics (also written to out_dir/metrics.json).
    `options`: implementation choices below the settings, for bench/ (speedups.TrainerOptions);
    `trackers`: where the run is logged as it goes (trackers.Trackers; none by default).
    On a rank of a data-parallel run (torchrun) only rank 0 writes, and returns the metrics."""
    trackers = trackers or Trackers()
    started = datetime.datetime.now(datetime.timezone.utc)
    out_dir = Path(out_dir)
    random.seed(training["seed"])
    torch.manual_seed(training["seed"])
    run = load(model_path, quantization, train_path, eval_path, training, lora, trust_remote_code,
               options)
    plan(run)
    align_ranks(run.ranks, run.model, training["seed"])

    update = Update(run.model, training)
    batches = batches_forever(run.train_examples, training["batch_size"], training["seed"],
                              training["batch_tokens"])
    fingerprint = run_fingerprint(model_path, quantization, training, lora, [train_path, eval_path])
    progress = resume_or_start(run, checkpoint_dir, fingerprint, update, batches)
    trackers.start(progress)

    peak = TrainingPeak(run.device, run.ranks)
    # SIGTERM/SIGINT: the step under way ends, its checkpoint is written, the run stops; every
    # rank of a data-parallel run at the same step
    with StopOnSignal(lambda step: bool(checkpoint_dir) and save_checkpoint(
            checkpoint_dir, run.model, update, progress, run.ranks), agree=run.ranks.any) as stop:
        train_steps(run, update, batches, progress, checkpoint_dir, peak, stop, trackers)
    before, after = progress["evaluations"][0], progress["evaluations"][-1]
    log.info("eval loss after training: %s (before %s)", with_error(after["loss"], after["loss_se"]),
             with_error(before["loss"], before["loss_se"]))

    settings = {"model_path": str(model_path), "quantization": quantization, "training": training,
                "lora": lora}
    train_memory = peak.read()
    finish(run.ranks)
    if not run.ranks.main:
        return None
    metrics = write_outputs(run, progress, train_memory, out_dir, model_path,
                            run_provenance(run.device, settings, started))
    trackers.finish(metrics)
    if checkpoint_dir:  # the outputs hold everything now
        remove_checkpoints(checkpoint_dir)
    return metrics


def load(model_path, quantization, train_path, eval_path, training, lora, trust_remote_code, options):
    """The tokenized splits, the tokenizer's pad id and the model set up for training."""
    ranks = start(pick_device(training["device"]), training["devices"])
    device = ranks.device
    log.info("device %s, quantization %s, model %s", device, quantization, model_path)
    pad_id = load_tokenizer(model_path, trust_remote_code).pad_token_id
    train_examples, eval_examples = read_tokenized(train_path), read_tokenized(eval_path)
    reset_peak_memory(device)
    model, setup = load_for_training(model_path, quantization, lora, training, device,
                                     trust_remote_code, options)
    trainable, total = model.get_nb_trainable_parameters()  # counts 4-bit weights unpacked
    log.info("LoRA r=%d on %s: %s trainable of %s parameters", lora["r"],
             ",".join(lora["target_modules"]), f"{trainable:,}", f"{total:,}")
    make_batch = functools.partial(pack if setup.packed else collate, pad_id=pad_id,
                                   device=device)
    return Run(training, quantization, device, model, setup, make_batch, train_examples,
               eval_examples, pad_id, ranks)


def plan(run):
    """Decide what a step recomputes (measured on the run's largest batch) and measure the
    card's bf16 rate; on CPU there is no comparable matmul peak."""
    probe = run.make_batch(largest_share(run.train_examples, run.training, run.ranks.world))
    run.memory = plan_memory(run.model, run.setup.memory_policy, probe, run.training,
                             run.quantization, run.setup.step_options)
    if run.device.type == "cuda":
        run.bf16_matmul_tflops = bf16_matmul_tflops(run.device)
    on = {True: "on", False: "off"}
    log.info("speed: torch.compile %s, fused loss %s%s, Liger layer kernels %s, packing %s%s, "
             "gradient checkpointing on %d of %d layers, %.0f%% of activations kept",
             on[run.setup.compiled], on[run.setup.fused_loss],
             " (logits at the labelled positions only)" if run.setup.target_logits else "",
             on[run.setup.fused_kernels],
             on[run.setup.packed],
             " (variable-length flash attention)" if run.setup.varlen_attention else "",
             run.memory.gradient_checkpointing_layers, run.memory.decoder_layers,
             100 * run.memory.activations_kept)


def resume_or_start(run, checkpoint_dir, fingerprint, update, batches):
    """The run's progress: restored from its latest checkpoint, with the data order replayed up
    to there; or, on a fresh start, none but the eval before training."""
    progress = resume(checkpoint_dir, fingerprint, run.model, update, run.training["steps"],
                      run.ranks, run.training["seed"])
    if progress:
        for _ in range(len(progress["steps"]) * run.training["grad_accum"]):
            next(batches)
        return progress
    before = run.evaluate()
    log.info("eval loss before training: %s (%d conversations, %s target tokens)",
             with_error(before.loss, before.loss_se), before.conversations,
             f"{before.target_tokens:,}")
    return {"fingerprint": fingerprint, "step": 0, "steps": [],
            "evaluations": [{"step": 0, **asdict(before)}]}


def train_steps(run, update, batches, progress, checkpoint_dir, peak, stop, trackers):
    """The steps not done yet, each recorded in `progress` and `trackers`, evaluated and
    checkpointed when due; after each, `stop` (graceful_stop.StopOnSignal) ends the run if a stop
    was asked."""
    training = run.training
    for step in range(len(progress["steps"]) + 1, training["steps"] + 1):
        window = [next(batches) for _ in range(training["grad_accum"])]
        result = one_step(run, update, window, step)
        attention = sum(attention_flops(run.model.config, [len(ids) for ids, _ in examples])
                        for examples in window)
        progress["steps"].append(step_record(step, result, sum(map(len, window)), attention,
                                             peak.read()["peak_memory_gb"]))
        trackers.step(progress["steps"][-1])
        progress["step"] = step
        if step == 1 or step % 10 == 0 or step == training["steps"]:
            log.info("step %d/%d  loss %.4f  acc %.3f  lr %.2e  %.2fs", step, training["steps"],
                     result.loss, result.token_accuracy, result.lr, result.seconds)
        if eval_due(step, training):
            with peak.left_out():  # eval's logits of a larger batch are not a step's memory
                evaluation = run.evaluate()
            progress["evaluations"].append({"step": step, **asdict(evaluation)})
            trackers.evaluation(progress["evaluations"][-1])
            log.info("step %d/%d  eval loss %s  acc %.3f", step, training["steps"],
                     with_error(evaluation.loss, evaluation.loss_se), evaluation.accuracy)
        if checkpoint_dir and checkpoint_due(step, training):
            save_checkpoint(checkpoint_dir, run.model, update, progress, run.ranks)
        stop.check(step)


def with_error(loss, standard_error):
    """'7.5012 ± 0.0431', or the loss alone where there is no standard error."""
    return f"{loss:.4f}" + ("" if standard_error is None else f" ± {standard_error:.4f}")


def eval_due(step, training):
    """Every eval_every-th step and the last, whose eval is the one after training."""
    every = training["eval_every"]
    return (bool(every) and step % every == 0) or step == training["steps"]


class TrainingPeak:
    """The training steps' peak memory, from the start of the loop: the evaluations between
    steps are left out (the peak so far is kept before each one and the counter reset after
    it). On a CPU the process's peak RSS, which cannot be reset, covers everything.
    Data-parallel: the largest rank's (every rank reads it at the same points)."""

    def __init__(self, device, ranks=ONE_PROCESS):
        self.device = device
        self.ranks = ranks
        self.kept = None
        reset_peak_memory(device)

    def read(self):
        """modeling.peak_memory's figures for the training steps so far."""
        current = peak_memory(self.device)
        measured = [key for key in ("peak_memory_gb", "peak_reserved_gb") if current[key] is not None]
        if self.kept is not None:
            current.update({key: max(current[key], self.kept[key]) for key in measured})
        return {**current, **dict(zip(measured, self.ranks.max([current[key] for key in measured])))}

    @contextlib.contextmanager
    def left_out(self):
        self.kept = self.read()
        yield
        reset_peak_memory(self.device)


def one_step(run, update, window, step):
    """step.train_step on this rank's shares of the window's micro-batches, its failures told
    in this run's terms."""
    shares = [share for share in map(run.ranks.share, window) if share]
    try:
        return train_step(run.model, [run.make_batch(share) for share in shares], update,
                          run.setup.step_options, ranks=run.ranks)
    except BatchOutOfMemory as error:  # the last checkpoint stays valid
        raise out_of_memory(f"at step {step}", error.batch, run.training, run.quantization,
                            run.memory.all_checkpointed) from error
    except LossNotFinite as error:  # raised before the update: the last checkpoint stays sound
        raise TrainingError(
            f"loss is {error.loss} at step {step}; training stopped there. Lower training.lr "
            f"(now {run.training['lr']}), add training.warmup_steps, or check the data"
        ) from None


def write_outputs(run, progress, train_memory, out_dir, model_path, provenance):
    """The adapter, train_log.csv and, last, metrics.json; returns the metrics."""
    # Write the adapter next to its final place and rename, so a crash never leaves a
    # half-written adapter that looks complete.
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_dir, partial_dir = out_dir / "adapter", out_dir / "adapter.partial"
    shutil.rmtree(partial_dir, ignore_errors=True)
    run.model.save_pretrained(partial_dir, safe_serialization=True)
    with_umask(partial_dir)  # safetensors writes 0600
    shutil.rmtree(adapter_dir, ignore_errors=True)
    partial_dir.rename(adapter_dir)

    write_train_log(progress["steps"], progress["evaluations"], out_dir / "train_log.csv")
    trainable, total = run.model.get_nb_trainable_parameters()
    device = run.device
    params = {
        "trainable_params": trainable,
        "total_params": total,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "devices": run.ranks.world,
        "random_init": bool(model_info(model_path).get("random_init")),
        "base_weights": weights_phrase(model_info(model_path)),  # None: the hub's or a directory's
        "train_conversations": len(run.train_examples),
        **run.setup.metrics(),
        **asdict(run.memory),
        "bf16_matmul_tflops": run.bf16_matmul_tflops,
        "flops_per_token": flops_per_token(run.model),
        "provenance": provenance,
    }
    metrics = summarize(progress["steps"], progress["evaluations"], train_memory, params)
    write_metrics(metrics, out_dir / "metrics.json")
    return metrics


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    variant = snakemake.params.variant
    training = variant["training"]
    arguments = {
        "model_path": snakemake.params.model_path,
        "quantization": variant["quantization"],
        "train_path": snakemake.input.train,
        "eval_path": snakemake.input.eval,
        "training": training,
        "lora": variant["lora"],
        "out_dir": str(Path(snakemake.output.metrics).parent),
        "trust_remote_code": snakemake.params.trust_remote_code,
        "checkpoint_dir": snakemake.params.checkpoints,
    }
    tracking = {"tracking": snakemake.params.tracking, "settings": variant,
                "record_path": snakemake.output.tracking}
    if training["devices"] > 1:  # this process becomes torchrun, which runs train() per rank
        launch(training["devices"], pick_device(training["device"]), snakemake.threads,
               {"train": arguments, "tracking": tracking, "log": snakemake.log[0]},
               Path(snakemake.params.checkpoints) / "torchrun.json",
               job={"rule": snakemake.rule, "wildcards": list(snakemake.wildcards)})
    torch.set_num_threads(snakemake.threads)
    with open_trackers(**tracking) as trackers:
        train(**arguments, trackers=trackers)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
