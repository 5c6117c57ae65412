"""Resumable training state: every `checkpoint_every` steps, and when a stop signal ends the run
(graceful_stop.py), the run's whole state (LoRA weights, optimizer, scheduler, RNG, the per-step
records, the job's log so far) goes to results/checkpoints/<variant>/seed-<seed>/step-N; a rerun
after a crash, `kill -9` or a stop resumes from the latest one of the very same run, ends exactly
where an uninterrupted run would, and its log starts with the earlier run's lines.
"""

import contextlib
import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from distributed import ONE_PROCESS, rank_seed
from errors import flush_logs, job_log_file
from outputs import with_umask

log = logging.getLogger("loranotes.train")

# Settings a run may change and still resume its checkpoint: they trade memory or devices for
# speed and leave the computation as it was (after running out of memory, checkpoint more and
# rerun; with more GPUs, resume on all of them).
RESUMABLE_CHANGES = {"checkpoint_every", "gradient_checkpointing", "memory_budget_gb", "devices"}
EARLIER_LOG = "job.log"  # in a checkpoint: the job's log up to it


def run_fingerprint(model_path, quantization, training, lora, data_paths):
    """A hash of everything that shapes the run: a checkpoint with another one is not resumed."""
    model_dir = Path(model_path)
    settings = {
        "model_path": str(model_path),
        # A rebuilt or replaced local model has new weight files: its old checkpoints are stale.
        "model_files": [
            (file.name, file.stat().st_size, file.stat().st_mtime_ns)
            for file in sorted(model_dir.glob("*.safetensors"))
        ],
        "quantization": quantization,
        "training": {key: value for key, value in training.items() if key not in RESUMABLE_CHANGES},
        "lora": lora,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in data_paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def checkpoint_due(step, training):
    every = training.get("checkpoint_every", 0)
    return bool(every) and (step % every == 0 or step == training["steps"])


def save_checkpoint(checkpoint_dir, model, update, progress, ranks=ONE_PROCESS):
    """Write step-N into a .partial directory, rename it when complete, drop older ones.
    `update`: the step.Update whose optimizer and scheduler resume; `progress`: JSON.
    Data-parallel: every rank calls it (each rank's random state is gathered: the ranks draw
    their own dropout masks); rank 0 writes. Weights and optimizer are the same on every rank."""
    rng = ranks.gather({
        "torch": torch.get_rng_state(),  # dropout masks
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    })
    if not ranks.main:
        return
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step-{progress['step']}"
    partial = checkpoint_dir / f"step-{progress['step']}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    trainable = {
        name: param.detach().cpu().contiguous()
        for name, param in model.named_parameters() if param.requires_grad
    }
    save_file(trainable, partial / "adapter.safetensors")
    torch.save({**update.state_dict(), "rng": rng}, partial / "optimizer.pt")
    (partial / "progress.json").write_text(json.dumps(progress))
    log_file = job_log_file()
    if log_file:  # Snakemake deletes a job's log before a rerun: the resumed log starts with it
        flush_logs()
        shutil.copyfile(log_file, partial / EARLIER_LOG)
    with_umask(partial)  # safetensors writes 0600
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for older in checkpoint_dir.glob("step-*"):
        if older != final:
            shutil.rmtree(older)


def latest_checkpoint(checkpoint_dir, fingerprint):
    """(path, progress) of the newest complete checkpoint of this very run, or None.

    Checkpoints of other settings or data are deleted: resuming them would mix two runs.
    """
    checkpoint_dir = Path(checkpoint_dir)
    complete = sorted(checkpoint_dir.glob("step-*[0-9]"), key=lambda path: int(path.name[5:]))
    if not complete:
        return None
    latest = complete[-1]
    try:
        progress = json.loads((latest / "progress.json").read_text())
    except (OSError, ValueError):
        progress = {}
    if progress.get("fingerprint") != fingerprint:
        log.info("ignoring %s: made with other settings or data; starting over", latest)
        shutil.rmtree(checkpoint_dir)
        return None
    return latest, progress


def restore_checkpoint(path, model, update, ranks=ONE_PROCESS, seed=0):
    """Weights, optimizer, scheduler and this rank's random state from `path`. A checkpoint of
    fewer ranks than now has no state for the extra ones: they start a stream of their own
    (distributed.rank_seed of the seed, rank and step)."""
    trainable = load_file(path / "adapter.safetensors")
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.data.copy_(trainable[name])
    state = torch.load(path / "optimizer.pt", weights_only=True)
    update.load_state_dict(state)
    rng = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one process's
    if ranks.rank < len(rng):
        torch.set_rng_state(rng[ranks.rank]["torch"])
        if rng[ranks.rank]["cuda"]:
            torch.cuda.set_rng_state_all(rng[ranks.rank]["cuda"])
    else:
        torch.manual_seed(rank_seed(seed, ranks.rank, int(path.name[5:])))


def resume(checkpoint_dir, fingerprint, model, update, total_steps, ranks=ONE_PROCESS, seed=0):
    """The progress of this run's latest checkpoint, restored into `model` and `update`; None
    when there is none to resume. Rank 0 picks the checkpoint (and deletes stale ones), every
    rank restores it."""
    checkpoint = None
    if checkpoint_dir and ranks.main:
        checkpoint = latest_checkpoint(checkpoint_dir, fingerprint)
    checkpoint = ranks.broadcast(checkpoint)
    if not checkpoint:
        return None
    path, progress = checkpoint
    restore_checkpoint(path, model, update, ranks, seed)
    keep_earlier_log(path / EARLIER_LOG, len(progress["steps"]))
    log.info("resuming from %s: %d of %d steps done%s", path, len(progress["steps"]),
             total_steps, f" (on {ranks.world} ranks)" if ranks.world > 1 else "")
    return progress


def keep_earlier_log(earlier_log, step):
    """Put the stopped run's log (up to its checkpoint) before this run's lines, then a
    "resumed at step N" line: the job's log tells the whole run."""
    log_file = job_log_file()
    if not log_file or not earlier_log.exists():
        return
    flush_logs()
    resumed = f"resumed at step {step}; the lines above are from the run that stopped\n"
    with open(log_file, "r+b") as f:  # the log handler appends (O_APPEND): its lines follow
        this_run = f.read()
        f.seek(0)
        f.write(earlier_log.read_bytes() + resumed.encode() + this_run)
        f.truncate()


def remove_checkpoints(checkpoint_dir):
    """Once the outputs hold everything: the run's checkpoints, and the folders above them
    (results/checkpoints/<variant>/, results/checkpoints/) once no other run uses them."""
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    parent = Path(checkpoint_dir).parent
    for folder in (parent, parent.parent):
        with contextlib.suppress(OSError):  # not empty: another run still has checkpoints
            folder.rmdir()
