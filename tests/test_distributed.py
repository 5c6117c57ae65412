"""Data-parallel training (training.devices) on CPU processes with gloo, started by torchrun as
the train rule starts them: 2 processes train like 1 with the same global batch, only rank 0
writes, and a run resumes from a 2-process checkpoint in 1 process and back."""

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import distributed
import train
from batches import balanced_shares, batches_forever, largest_batch, largest_share
from conftest import REPO
from experiment_config import TRAINING_DEFAULTS
from test_robustness import tiny_model, train_args  # noqa: F401  (fixture)

# What train_log.csv must agree on between 1 and 2 processes (seconds and memory differ).
COMPARED = ["step", "loss", "token_accuracy", "lr", "grad_norm", "tokens", "conversations",
            "eval_loss", "eval_accuracy"]
TOLERANCE = 1e-5  # float32 sums in another order: the 2-process losses differ by ~1e-7

# A rank as torchrun starts it (train_rank.py), which records what it writes (sys.addaudithook)
# and, with a step given, stops making progress once that step's checkpoint is written, for
# the test to kill the whole run there.
RANK_PROGRAM = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
arguments_file, watched, stall_after = sys.argv[2], sys.argv[3], int(sys.argv[4])
writes = []

def audit(event, args):
    if event == "open" and isinstance(args[0], str) and any(c in (args[1] or "") for c in "wax+"):
        writes.append(args[0])
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        writes.append(str(args[0]))

with open(f"{arguments_file}.rank-{os.environ['RANK']}.pid", "w") as out:
    out.write(str(os.getpid()))
sys.addaudithook(audit)
import torch
import train_rank

checkpoint = json.load(open(arguments_file))["train"]["checkpoint_dir"]
def stall_once_checkpointed(module, inputs):
    if stall_after and torch.is_grad_enabled() and os.path.exists(f"{checkpoint}/step-{stall_after}"):
        time.sleep(3600)

torch.nn.modules.module.register_module_forward_pre_hook(stall_once_checkpointed)
try:
    train_rank.main(arguments_file)
finally:
    mine = [path for path in writes if path.startswith(watched)]
    with open(f"{watched}/writes-rank-{os.environ['RANK']}.json", "w") as out:
        json.dump(mine, out)
"""


def on_ranks(args, tmp_path, name, devices=2, stall_after=0):
    """Starts train.train(**args) on `devices` CPU ranks with torchrun (distributed's own
    command); returns the Popen of torchrun, in a session of its own."""
    args["training"]["devices"] = devices
    program, arguments_file = tmp_path / "rank_program.py", tmp_path / f"{name}.json"
    program.write_text(RANK_PROGRAM)
    arguments_file.write_text(json.dumps({"train": args, "log": str(tmp_path / f"{name}.log")}))
    command = distributed.torchrun_command(devices, arguments_file)
    command[command.index(str(distributed.ENTRY))] = str(program)
    command[-1:] = [str(REPO / "scripts"), str(arguments_file), str(tmp_path), str(stall_after)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def finished(process):
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output
    return output


def killed_after(process, checkpoint, arguments_file):
    """Waits for `checkpoint` (and for no older one), then kills the whole run: torchrun and
    its ranks (which run in sessions of their own)."""
    deadline = time.monotonic() + 300
    while (not checkpoint.exists() or len(list(checkpoint.parent.iterdir())) > 1) \
            and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    for pid_file in arguments_file.parent.glob(f"{arguments_file.name}.rank-*.pid"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    output = process.communicate()[0]
    assert checkpoint.exists(), output


def logged(out_dir):
    return pd.read_csv(out_dir / "train_log.csv")[COMPARED]


def assert_trained_alike(out_dir, expected_dir):
    pd.testing.assert_frame_equal(logged(out_dir), logged(expected_dir), check_exact=False,
                                  rtol=0, atol=TOLERANCE)
    expected = load_file(expected_dir / "adapter" / "adapter_model.safetensors")
    weights = load_file(out_dir / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.allclose(weights[name], weight, atol=TOLERANCE), name


def run_args(tiny_model, out_dir, checkpoint_dir=None, **training):
    args = train_args(tiny_model, out_dir, checkpoint_dir, **training)
    args["lora"]["dropout"] = 0.0  # the ranks draw their own dropout masks
    return args


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory):
    """The 1-process runs the 2-process ones must reproduce: padded batches of 3 conversations
    (an odd count: the ranks' shares differ), and packed batches of at most 200 tokens."""
    root = tmp_path_factory.mktemp("one_process")
    runs = {"padded": {"batch_size": 3, "packing": False},
            "token budget": {"batch_tokens": 200, "packing": True}}
    for name, training in runs.items():
        train.train(**run_args(tiny_model, root / name, eval_every=5, **training))
    return root, runs


@pytest.fixture(scope="module")
def two_processes(tiny_model, one_process, tmp_path_factory):
    """The token-budget run on 2 ranks from the start, with its log and what each rank wrote."""
    root = tmp_path_factory.mktemp("two_processes")
    _, runs = one_process
    args = run_args(tiny_model, root / "out", root / "checkpoints", eval_every=5,
                    **runs["token budget"])
    output = finished(on_ranks(args, root, "run"))
    return root, output


def test_two_processes_train_like_one_with_the_same_global_batch(one_process, two_processes):
    reference, _ = one_process
    root, _ = two_processes
    assert_trained_alike(root / "out", reference / "token budget")
    metrics = json.loads((root / "out" / "metrics.json").read_text())
    expected = json.loads((reference / "token budget" / "metrics.json").read_text())
    assert (metrics["devices"], expected["devices"]) == (2, 1)
    for key in ("eval_loss_before", "eval_loss_after", "eval_loss_after_se", "final_train_loss",
                "train_tokens", "train_examples_seen", "eval_target_tokens", "eval_conversations"):
        assert metrics[key] == pytest.approx(expected[key], abs=TOLERANCE), key
    # the tokens of both ranks per second of the (shared) step
    assert metrics["tokens_per_s"] > 0 and metrics["train_tokens"] == expected["train_tokens"]


def test_only_rank_0_writes_and_logs(two_processes):
    root, output = two_processes
    rank_0 = json.loads((root / "writes-rank-0.json").read_text())
    rank_1 = json.loads((root / "writes-rank-1.json").read_text())
    assert rank_1 == []
    assert any("metrics.json" in path for path in rank_0)
    assert any("checkpoints/step-4" in path for path in rank_0)
    assert sorted(p.name for p in (root / "out").iterdir()) == ["adapter", "metrics.json",
                                                               "train_log.csv"]
    assert not (root / "checkpoints").exists()  # the finished run removed them
    log = (root / "run.log").read_text().splitlines()
    assert sum(line.startswith("step 12/12  loss") for line in log) == 1, log
    assert sum(line.startswith("eval loss before training") for line in log) == 1, log
    assert not [line for line in log if line.startswith("rank 1")], log
    assert log[0].startswith("data-parallel on 2 ranks (gloo)"), log


def test_resume_a_2_process_checkpoint_in_1_process(tiny_model, one_process, tmp_path, caplog):
    reference, runs = one_process
    args = run_args(tiny_model, tmp_path / "out", tmp_path / "checkpoints", eval_every=5,
                    **runs["padded"])
    checkpoint = tmp_path / "checkpoints" / "step-8"
    killed_after(on_ranks(json.loads(json.dumps(args)), tmp_path, "killed", stall_after=8),
                 checkpoint, tmp_path / "killed.json")
    with caplog.at_level("INFO", logger="loranotes.train"):
        train.train(**args)  # devices: 1
    assert f"resuming from {checkpoint}: 8 of 12 steps done" in caplog.messages
    assert_trained_alike(tmp_path / "out", reference / "padded")


def test_resume_a_1_process_checkpoint_on_2_processes(tiny_model, one_process, tmp_path):
    reference, runs = one_process
    args = run_args(tiny_model, tmp_path / "out", tmp_path / "checkpoints", eval_every=5,
                    **runs["padded"])
    checkpoint = tmp_path / "checkpoints" / "step-4"
    killed_after(on_ranks(json.loads(json.dumps(args)), tmp_path, "killed", devices=1,
                          stall_after=4), checkpoint, tmp_path / "killed.json")
    output = finished(on_ranks(args, tmp_path, "resumed"))
    log = (tmp_path / "resumed.log").read_text()
    assert f"resuming from {checkpoint}: 4 of 12 steps done (on 2 ranks)" in log, output
    assert_trained_alike(tmp_path / "out", reference / "padded")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["devices"] == 2


def test_a_run_on_several_devices_outside_torchrun_is_refused(tiny_model, tmp_path):
    args = run_args(tiny_model, tmp_path / "out", devices=2)
    with pytest.raises(distributed.DistributedError,
                       match="training.devices is 2, but this is one of 1 process: .*torchrun"):
        train.train(**args)


def test_more_gpus_than_visible_is_refused_before_starting(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.DistributedError,
                       match=r"training.devices is 4, but 1 GPU is visible .*ask the job for 4 GPUs"):
        distributed.check_devices(4, torch.device("cuda"))
    distributed.check_devices(4, torch.device("cpu"))  # CPU processes: as many as asked


def conversations(*lengths):
    return [([7] * length, [7] * length) for length in lengths]


def test_shares_are_disjoint_cover_the_batch_and_balance_tokens():
    batch = conversations(50, 10, 40, 30, 20, 5)
    shares = balanced_shares(batch, 2)
    assert sorted(map(len, [e for share in shares for e, _ in share])) == sorted([50, 10, 40, 30, 20, 5])
    assert [sum(len(ids) for ids, _ in share) for share in shares] == [80, 75]
    # each share keeps the batch's order; fewer conversations than ranks leave a share empty
    assert [len(ids) for ids, _ in shares[0]] == [50, 10, 20]
    assert balanced_shares(conversations(9), 2) == [conversations(9), []]


def test_each_rank_plans_memory_for_its_largest_share():
    examples = conversations(100, 90, 80, 70, 60, 50, 40)
    training = {**TRAINING_DEFAULTS, "batch_size": 5}
    assert largest_share(examples, training, 1) == largest_batch(examples, training)
    assert [len(ids) for ids, _ in largest_share(examples, training, 2)] == [100, 90, 80]
    by_tokens = {**training, "batch_tokens": 300}
    # a share's tokens: at most its part of the budget plus the longest conversation
    assert sum(len(ids) for ids, _ in largest_share(examples, by_tokens, 2)) == 150 + 100
    for rank_count, seed in itertools.product((2, 3), range(5)):  # the run's batches
        bound = sum(len(ids) for ids, _ in largest_share(examples, by_tokens, rank_count))
        batches = batches_forever(examples, 5, seed, batch_tokens=300)
        for batch in itertools.islice(batches, 10):
            assert all(sum(len(ids) for ids, _ in share) <= bound
                       for share in balanced_shares(batch, rank_count))


def test_mfu_of_a_run_on_several_devices_is_over_all_their_cards():
    from run_metrics import speed_summary

    frame = pd.DataFrame({"seconds": [1.0] * 5, "tokens": [1000] * 5, "attention_flops": [0] * 5})
    params = {"flops_per_token": 1e9, "bf16_matmul_tflops": 1.0}  # 1e12 FLOP/s per card
    assert speed_summary(frame, params)["mfu"] == pytest.approx(1.0)
    assert speed_summary(frame, {**params, "devices": 4})["mfu"] == pytest.approx(0.25)


def test_a_sigterm_to_the_job_reaches_every_rank(tiny_model, tmp_path):
    """The job's process is torchrun (distributed.launch execs it): what SLURM or Snakemake
    sends it, it forwards to the ranks, which run in sessions of their own."""
    args = run_args(tiny_model, tmp_path / "out", tmp_path / "checkpoints")
    process = on_ranks(args, tmp_path, "stopped", stall_after=4)
    checkpoint = tmp_path / "checkpoints" / "step-4"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = [int(path.read_text()) for path in tmp_path.glob("stopped.json.rank-*.pid")]
    assert len(ranks) == 2
    process.send_signal(signal.SIGTERM)  # to torchrun alone, not its process group
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output
    for pid in ranks:
        with pytest.raises(ProcessLookupError):  # gone, not left training on its own
            os.kill(pid, 0)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_the_notes_show_the_device_count_of_a_run_on_several(tmp_path):
    from test_report import render, section
    from util import fake_metrics

    def v2_on_4_gpus(index, seed, **overrides):
        metrics = fake_metrics(index, seed, **overrides)
        if index == 1:
            metrics.update(device="NVIDIA H100 80GB HBM3", devices=4)
            metrics["provenance"]["device"] = "NVIDIA H100 80GB HBM3"
        return metrics

    report = render(tmp_path, metrics_of=v2_on_4_gpus)
    assert "parameters; on NVIDIA H100 80GB HBM3 × 4 (data-parallel, training.devices)\n" in \
        section(report, "v2: no quantization")
    assert "parameters; on cpu\n" in section(report, "v1: nf4 baseline")  # metrics without it: 1
    assert "- Hardware: NVIDIA H100 80GB HBM3 × 4; x86_64\n" in section(report, "Provenance")


class TwoRanks(distributed.Ranks):
    """Rank 0 of 2 whose other rank's random state is `other` (gather without processes)."""

    def __init__(self, other):
        super().__init__(rank=0, world=2)
        object.__setattr__(self, "other", other)

    def gather(self, value):
        return [value, self.other]


def test_a_checkpoint_keeps_each_ranks_random_state_and_maps_it_to_the_ranks_resuming(tmp_path):
    from resume import restore_checkpoint, save_checkpoint
    from step import Update

    model = torch.nn.Linear(3, 2)
    update = Update(model, {**TRAINING_DEFAULTS, "lr": 1e-3})
    torch.manual_seed(11)
    other = {"torch": torch.get_rng_state(), "cuda": []}
    torch.manual_seed(22)
    mine = torch.get_rng_state()
    save_checkpoint(tmp_path, model, update, {"step": 4, "steps": []}, TwoRanks(other))

    def draw_after_restoring(rank, world):
        torch.manual_seed(99)
        restore_checkpoint(tmp_path / "step-4", model, update,
                           distributed.Ranks(rank=rank, world=world), seed=5)
        return torch.rand(3)

    torch.set_rng_state(mine)
    expected_0 = torch.rand(3)
    torch.set_rng_state(other["torch"])
    expected_1 = torch.rand(3)
    assert torch.equal(draw_after_restoring(0, 1), expected_0)  # 2 ranks -> 1: rank 0's
    assert torch.equal(draw_after_restoring(1, 2), expected_1)  # same ranks: each its own
    torch.manual_seed(distributed.rank_seed(5, 2, 4))
    expected_2 = torch.rand(3)
    assert torch.equal(draw_after_restoring(2, 3), expected_2)  # a new rank: a stream of its own
    assert not torch.equal(expected_2, expected_1)
