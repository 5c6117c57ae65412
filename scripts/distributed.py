"""Data-parallel training: one run on `training.devices` processes, started by torchrun
(PyTorch's launcher, torch.distributed.run), one GPU each (NCCL) or CPU processes (gloo).

Every rank holds the whole model and the same LoRA weights. Each micro-batch of the global
batch (batch_size conversations or batch_tokens tokens, as the config says) is split into
disjoint shares, one per rank (batches.balanced_shares); each rank's backward divides its
summed token loss by the count of targets over all ranks, so one all-reduce (a sum) of the LoRA
gradients gives every rank the gradient of the global batch, and the same clipping and AdamW
step keep the weights equal. Changing the number of devices changes the speed, not the training.

Why one all-reduce per step rather than torch's DistributedDataParallel: the gradients are
only LoRA's (r=16 on the embedded default's tiny Qwen3: 38,912 numbers), the token-weighted
normaliser already makes a plain sum right, and a rank whose share of a micro-batch is empty
(batch_tokens with one long conversation) simply contributes zeros, where DDP would need every
rank to run a forward pass of the same module for every micro-batch.

`Ranks` is the process group as the trainer sees it; ONE_PROCESS, the default everywhere, makes
every operation the identity, so the single-process path is unchanged.
"""

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from batches import balanced_shares
from errors import LoranotesError

log = logging.getLogger("loranotes.train")

ENTRY = Path(__file__).with_name("train_rank.py")  # what torchrun starts on every rank


class DistributedError(LoranotesError):
    """training.devices asks for more than this machine or process group has."""


@dataclass(frozen=True)
class Ranks:
    """This process's place among the run's processes, and the collectives the trainer uses.
    `device`: where this rank computes (and where NCCL's tensors must live)."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        """Rank 0: the one that logs progress and writes checkpoints and outputs."""
        return self.rank == 0

    def share(self, examples):
        """This rank's disjoint part of one micro-batch of conversations (maybe empty)."""
        return examples if self.world == 1 else balanced_shares(examples, self.world)[self.rank]

    def eval_share(self, examples):
        """This rank's contiguous slice of the held-out split (rank order is split order)."""
        per_rank = -(-len(examples) // self.world)
        return examples[self.rank * per_rank : (self.rank + 1) * per_rank]

    def sum(self, numbers):
        """Element-wise sums of `numbers` over the ranks (float64: counts stay exact)."""
        return self._reduce(numbers, torch.distributed.ReduceOp.SUM)

    def max(self, numbers):
        return self._reduce(numbers, torch.distributed.ReduceOp.MAX)

    def any(self, flag):
        """Whether any rank's `flag` is set: a stop that every rank must take at the same step
        (a SIGTERM, which torchrun forwards to every rank, arrives at each at its own moment)."""
        return bool(self.max([float(flag)])[0])

    def _reduce(self, numbers, op):
        if self.world == 1:
            return list(numbers)
        values = torch.tensor([float(n) for n in numbers], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values, op=op)
        return values.tolist()

    def reduce_gradients(self, params):
        """Sum the gradients of `params` over the ranks, as one flat buffer (one collective). A
        parameter without a gradient (no micro-batch on this rank) counts as zeros."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        offset = 0
        for param, grad in zip(params, grads):
            param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
            offset += grad.numel()

    def broadcast_parameters(self, params):
        """Rank 0's values of `params` on every rank (the LoRA initialisation, seeded the same
        on every rank, made identical for certain)."""
        if self.world == 1:
            return
        for param in params:
            torch.distributed.broadcast(param.data, src=0)

    def gather(self, value):
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's `value` on every rank."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = Ranks()


def start(device, devices=1):
    """The run's Ranks: one process, or the process group torchrun started this rank in
    (WORLD_SIZE, RANK, LOCAL_RANK in the environment), joined here: NCCL on GPUs, each rank on
    the GPU of its LOCAL_RANK; gloo on CPUs. `device`: modeling.pick_device's choice;
    `devices`: training.devices, which must be the number of processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != devices:
        raise DistributedError(
            f"training.devices is {devices}, but this is one of {world} process"
            f"{'es' if world != 1 else ''}: a run on several devices is started by torchrun "
            "(the train rule does that; see README, 'Several GPUs')")
    if world == 1:
        return Ranks(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        torch.distributed.init_process_group("gloo")
    log.info("data-parallel on %d ranks (%s): each takes a share of every batch",
             world, torch.distributed.get_backend())
    return Ranks(rank, world, device)


def align_ranks(ranks, model, seed):
    """After set-up, before the first step: rank 0's LoRA weights on every rank, and a random
    stream of its own for every rank but rank 0 (whose stream is the one-process run's)."""
    ranks.broadcast_parameters([p for p in model.parameters() if p.requires_grad])
    if ranks.rank > 0:
        torch.manual_seed(rank_seed(seed, ranks.rank))


def configure_rank_logging(log_path, rank):
    """Rank 0 logs like a one-process job (errors.configure_logging: the job's log and the
    terminal); the other ranks only their warnings and errors, into the same log, marked."""
    from types import SimpleNamespace

    from errors import configure_logging, quiet_known_noise

    job = json.loads(os.environ.get("LORANOTES_JOB", "{}"))
    if rank == 0:
        configure_logging(SimpleNamespace(log=[log_path], **job))
        return
    quiet_known_noise()
    to_log = logging.FileHandler(log_path, delay=True)  # opened only for a warning
    to_log.setFormatter(logging.Formatter(f"rank {rank}: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[to_log])


def finish(ranks):
    if ranks.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def rank_seed(seed, rank, step=0):
    """The seed of a rank's own random stream (dropout masks) for ranks > 0, and for any rank a
    checkpoint has no state of: every rank draws different masks, reproducibly."""
    digest = hashlib.sha256(f"{seed}/{rank}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def check_devices(devices, device):
    """Refuse a `training.devices` this machine cannot give: more GPUs than are visible."""
    if device.type != "cuda":
        return
    visible = torch.cuda.device_count()
    if devices > visible:
        raise DistributedError(
            f"training.devices is {devices}, but {visible} GPU{'s are' if visible != 1 else ' is'} "
            f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            f"lower training.devices, or ask the job for {devices} GPUs")


def torchrun_command(devices, arguments_file):
    """The command that starts `devices` ranks of train_rank.py on this node: torchrun with a
    standalone rendezvous (a free local port, so jobs sharing a node do not collide)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={devices}", str(ENTRY), str(arguments_file)]


def launch(devices, device, threads, arguments, arguments_file, job=None):
    """Replace this process by torchrun running `devices` ranks of train.train(**arguments["train"])
    (JSON, written to `arguments_file`; the job's log file is arguments["log"], `job` its rule and
    wildcards for the terminal's prefix). exec, not a child: the job's process is torchrun
    itself, so Snakemake's and SLURM's signals reach it and it forwards them to every rank.
    Each rank gets threads // devices CPU threads."""
    check_devices(devices, device)
    Path(arguments_file).parent.mkdir(parents=True, exist_ok=True)
    Path(arguments_file).write_text(json.dumps(arguments))
    per_rank = max(1, threads // devices)
    log.info("starting %d ranks with torchrun (%s, %d CPU thread%s each)", devices,
             "NCCL" if device.type == "cuda" else "gloo", per_rank, "" if per_rank == 1 else "s")
    for handler in logging.getLogger().handlers:
        handler.flush()
    environment = {**os.environ, "OMP_NUM_THREADS": str(per_rank),
                   "LORANOTES_JOB": json.dumps(job or {})}
    os.execve(sys.executable, torchrun_command(devices, arguments_file), environment)
