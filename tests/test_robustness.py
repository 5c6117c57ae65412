"""Robust under bad input, interruption and change, one test group per item of the issue:

1. bad config, data and models are caught early, with one line that names the key and the fix;
2. training is never wasted: a NaN stops the variant at its step, a run killed with SIGKILL
   resumes from its checkpoint and ends exactly as an uninterrupted run, outputs appear whole;
3. a change reruns only what it affects (checked with dry runs on a finished run);
4. safe by default: no token in any output, safetensors only, no remote code, inert text.

Everything runs on a tiny config (2 variants, 4 steps) or on a model built in-process.
"""

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml
from markdown_it import MarkdownIt

import train
from build_model import build_model
from bundled_sample import make_conversations
from chat_format import PromptFormat
from conftest import REPO, copy_workflow, run_snakemake
from errors import LoranotesError
from model_sources import ModelError
from modeling import load_base_model, load_tokenizer
from resume import latest_checkpoint
from prepare_data import main as prepare_data_main
from render_report import fence
from tokenize_data import tokenize_split
from util import fake_snakemake
from experiment_config import LORA_DEFAULTS, TRAINING_DEFAULTS, resolve_config

FAKE_TOKEN = "hf_fakeSECRET1234567890"
TINY_QWEN3 = {
    "architecture": "qwen3", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 512, "tie_word_embeddings": True,
}
# A dataset with one bad row of each kind the data step skips (and one with a system prompt,
# which is kept), behind 40 good conversations.
BAD_ROWS = [
    '{"messages": [',
    '{"prompt": "hi"}',
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}),
    json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                             {"role": "assistant", "content": "c"}]}),
    json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": " "}]}),
]
SYSTEM_ROW = {"messages": [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is LoRA?"},
    {"role": "assistant", "content": "A low-rank adapter trained on top of frozen weights."},
]}
SKIP_REASONS = {
    "invalid JSON", "no known schema (no 'messages', 'conversations' or 'data' list)", "unknown role 'bot'",
    "turns do not alternate user/assistant", "no assistant turn", "empty content",
}


def tiny_config():
    """The embedded default cut down: one model, two variants, 4 steps, a dirty dataset."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["dataset"].update(source="dirty.jsonl", num_train=24, num_eval=8, bundled_size=40)
    config["prompts"] = config["prompts"][:1]
    config["generation"] = {"max_new_tokens": 4}
    config["training"].update(steps=4, max_length=96, checkpoint_every=2, seeds=[0, 1])
    del config["models"]["tiny-llama"]
    config["models"]["tiny-qwen3"]["init"]["pretrain"] = {"steps": 10}  # weights are not the point here
    config["variants"] = {
        "v1": {"title": "baseline", "model": "tiny-qwen3", "quantization": "none"},
        "v2": {"from": "v1", "title": "higher lr", "training": {"lr": 2.0e-2}},
    }
    config["comparisons"] = []
    return config


def write_config(workdir, config, name="tiny.yaml"):
    (workdir / name).write_text(yaml.safe_dump(config, sort_keys=False))
    return name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config run end to end with a (fake) HF_TOKEN in the environment (~40 s)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    rows = [json.dumps(row) for row in make_conversations(n=40, seed=0)]
    lines = [*rows, *BAD_ROWS, json.dumps(SYSTEM_ROW)]
    (workdir / "dirty.jsonl").write_text("\n".join(lines) + "\n")
    write_config(workdir, tiny_config())
    with pytest.MonkeyPatch.context() as env:
        env.setenv("HF_TOKEN", FAKE_TOKEN)
        run_snakemake(workdir, "--cores", "2", "--configfile", "tiny.yaml")
    return workdir


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 1-layer random-init Qwen3 and its tokenized data, built in-process (~3 s)."""
    root = tmp_path_factory.mktemp("tiny_model")
    conversations = make_conversations(n=40, seed=0)
    texts = (m["content"] for c in conversations for m in c["messages"])
    build_model(TINY_QWEN3, texts, root / "model")
    prompt_format = PromptFormat(load_tokenizer(root / "model"))
    for split, rows in (("train", conversations[:32]), ("eval", conversations[32:])):
        with_ids = [{"id": str(i), **c} for i, c in enumerate(rows)]
        frame, _ = tokenize_split(prompt_format, with_ids, 64)
        frame.to_parquet(root / f"{split}.parquet")
    return root


def train_args(tiny_model, out_dir, checkpoint_dir=None, **training):
    return {
        "model_path": str(tiny_model / "model"), "quantization": "none",
        "train_path": str(tiny_model / "train.parquet"),
        "eval_path": str(tiny_model / "eval.parquet"),
        "training": {**TRAINING_DEFAULTS, "steps": 12, "batch_size": 2, "grad_accum": 2, "lr": 1e-2,
                     "eval_batch_size": 8, "checkpoint_every": 4, "device": "cpu", **training},
        "lora": {**LORA_DEFAULTS, "dropout": 0.1},  # dropout: the RNG state must resume too
        "out_dir": str(out_dir), "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
    }


# ---------------------------------------------------------------------------------------------
# 1. Bad input, caught early, with a message that names the file and key and says what to do

def no_weights_model(config):
    config["models"]["tiny-qwen3"] = {"path": "./empty-model"}


CONFIG_MISTAKES = {
    "typo": (lambda c: c["training"].update(lerning_rate=0.01),
             "training.lerning_rate: unknown key (did you mean lr?)"),
    "wrong type": (lambda c: c["training"].update(steps="many"),
                   "training.steps: expected integer, got 'many'"),
    "yaml float": (lambda c: c["training"].update(lr="1e-4"),
                   "training.lr: expected number, got '1e-4' (YAML reads 1e-4 as a string"),
    "unknown from": (lambda c: c["variants"]["v2"].update({"from": "v9"}),
                     "variants.v2.from: 'v9' is not a variant"),
    "unknown model": (lambda c: c["variants"]["v1"].update(model="gpt"),
                      "variants.v1.model: 'gpt' is not a model"),
    "cycle": (lambda c: c["variants"]["v1"].update({"from": "v2"}),
              "variants.v2.from: inheritance cycle v1 -> v2 -> v1"),
    "comparison": (lambda c: c["comparisons"].append({"name": "x", "variants": ["v1", "v3"]}),
                   "comparisons[0] ('x'): 'v3' is not a variant"),
    "quantization": (lambda c: c["variants"]["v2"].update(quantization="int8"),
                     "variants.v2.quantization: 'int8' is not one of: nf4, none"),
    "target modules": (lambda c: c["lora"].update(target_modules=["q_proj", "c_attn"]),
                       "variants.v1.lora.target_modules: c_attn is not a layer of model tiny-qwen3; "
                       "its layers LoRA can wrap: down_proj, embed_tokens, gate_proj, k_proj, "
                       "lm_head, o_proj, q_proj, up_proj, v_proj"),
    "no weights": (no_weights_model, "models.tiny-qwen3.path: ./empty-model has no weights"),
    "token": (lambda c: c.update(hf_token=FAKE_TOKEN), "hf_token: unknown key; never put"),
}


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("config_mistakes"))
    (workdir / "dirty.jsonl").write_text("")  # the dry run checks that dataset.source exists
    (workdir / "empty-model").mkdir()
    (workdir / "empty-model" / "config.json").write_text('{"model_type": "qwen3"}')
    return workdir


@pytest.mark.parametrize("mistake", CONFIG_MISTAKES)
def test_config_mistake_stops_the_dry_run_with_one_clear_line(workflow_copy, mistake):
    change, expected = CONFIG_MISTAKES[mistake]
    config = tiny_config()
    change(config)
    name = write_config(workflow_copy, config, f"{mistake.replace(' ', '_')}.yaml")

    result = run_snakemake(workflow_copy, "-n", "--configfile", name, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{name}: {expected}" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) < 8, output
    assert FAKE_TOKEN not in output
    assert not (workflow_copy / "results").exists()


def test_lora_targets_of_a_model_known_only_once_loaded_are_checked_before_training(
    tiny_model, tmp_path
):
    args = train_args(tiny_model, tmp_path / "out")
    args["lora"]["target_modules"] = ["q_proj", "query_key_value"]
    with pytest.raises(train.TrainingError, match=r"lora.target_modules: query_key_value is not a "
                       r"layer of .*; its layers LoRA can wrap: down_proj, embed_tokens, gate_proj"):
        train.train(**args)


def test_bad_rows_are_skipped_counted_logged_and_reported(tiny_run):
    stats = json.loads((tiny_run / "results/data/stats.json").read_text())
    assert stats["rows"] == 40 + len(BAD_ROWS) + 1 and stats["usable"] == 41  # system row kept
    assert set(stats["skipped"]) == SKIP_REASONS and sum(stats["skipped"].values()) == len(BAD_ROWS)
    data_log = (tiny_run / "results/logs/prepare_data.log").read_text()
    assert "skipped 1: invalid JSON (first at dirty.jsonl:41)" in data_log
    report = (tiny_run / "results/report.md").read_text()
    assert f"`dirty.jsonl`: {stats['rows']} rows, {stats['usable']} usable; skipped " in report
    assert all(f"1 × {reason}" in report for reason in SKIP_REASONS)
    # Conversations longer than max_length are shortened (or dropped) and counted, in the log
    # and the report, each count within its total.
    token_stats = json.loads((tiny_run / "results/tokenized/tiny-qwen3-L96/stats.json").read_text())
    train = token_stats["train"]
    assert train["shortened"] > 0 and train["conversations_in"] == stats["train"]
    assert train["kept_whole"] + train["shortened"] + train["dropped"] == train["conversations_in"]
    assert "truncated to 96" in (tiny_run / "results/logs/tokenize/tiny-qwen3-L96.log").read_text()
    assert (f"training on {train['conversations']} of the {train['conversations_in']} training "
            f"conversations ({train['kept_whole']} whole, {train['shortened']} shortened") in report


def test_a_dataset_empty_after_filtering_stops_with_one_line(tmp_path, caplog, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_text("\n".join(BAD_ROWS) + "\n")
    log = tmp_path / "prepare_data.log"
    snakemake = fake_snakemake(
        output={"train": tmp_path / "train.jsonl", "eval": tmp_path / "eval.jsonl",
                "stats": tmp_path / "stats.json"},
        params={"dataset": {"source": str(source), "split": "train", "num_train": 4, "num_eval": 1,
                            "seed": 0}},
        log={"log": log},
    )
    with pytest.raises(SystemExit) as stop:
        prepare_data_main(snakemake)
    assert stop.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("loranotes: no usable conversations out of 6 rows")
    assert "\n" not in message
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]  # logged
    assert not (tmp_path / "train.jsonl").exists()


def test_model_problems_are_one_line_with_cause_and_fix(tiny_model, tmp_path, monkeypatch):
    # A hub id that cannot be reached offline: through a script's entry point, as Snakemake runs it.
    program = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from errors import entry_point\nfrom modeling import load_tokenizer\n"
        "entry_point(load_tokenizer)('no-such-org/no-such-model')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, str(REPO / "scripts")], capture_output=True, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": FAKE_TOKEN},
    )
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last_line.startswith("loranotes: could not download no-such-org/no-such-model")
    assert "download it first" in last_line and "local directory" in last_line
    assert FAKE_TOKEN not in result.stderr

    # A local directory without weights.
    (tmp_path / "config-only").mkdir()
    config_json = (tiny_model / "model" / "config.json").read_text()
    (tmp_path / "config-only" / "config.json").write_text(config_json)
    with pytest.raises(ModelError, match="config-only has no weights .*safetensors"):
        load_base_model(str(tmp_path / "config-only"), "none", torch.device("cpu"))

    # nf4 without a working bitsandbytes.
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ModelError, match="nf4 needs a working bitsandbytes .* quantization: none"):
        load_base_model(str(tiny_model / "model"), "nf4", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# 2. Training never wasted

def is_decoder(module):
    """The transformers model under the output layer (Qwen3Model inside Qwen3ForCausalLM): it
    runs once per forward pass, whether the loss comes from all logits or from the targets'."""
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel) and module.get_output_embeddings() is None


@contextlib.contextmanager
def after_training_forward(action):
    """Calls action(n, output) after the n-th forward pass of the decoder with gradients on
    (a training micro-batch, not evaluation), through torch's global module hooks; a result
    other than None replaces the decoder's output (its last hidden states, which the loss reads
    however it is computed)."""
    calls = []

    def hook(module, args, output):
        if is_decoder(module) and torch.is_grad_enabled():
            calls.append(1)
            return action(len(calls), output)
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def counted_evaluations():
    """The evaluations of the held-out split while inside (one list item per evaluation of
    an eval split of one batch): forward passes of the decoder without gradients."""
    calls = []

    def hook(module, args, output):
        if is_decoder(module) and not torch.is_grad_enabled():
            calls.append(1)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_nan_loss_stops_the_variant_with_its_step_and_keeps_the_checkpoint(tiny_model, tmp_path):
    def nan_at_step_3(call, output):
        if call == 3:
            output.last_hidden_state = output.last_hidden_state * float("nan")
            return output
        return None

    args = train_args(tiny_model, tmp_path / "out", tmp_path / "checkpoints",
                      grad_accum=1, checkpoint_every=2)
    with after_training_forward(nan_at_step_3), \
            pytest.raises(train.TrainingError, match=r"^loss is nan at step 3; .*training.lr"):
        train.train(**args)
    assert not (tmp_path / "out" / "adapter").exists()
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


# Runs train.train(**json args) in a fresh process that stops making progress right after the
# checkpoint of step `stall_after` is written (its next training forward pass waits), for the
# test to kill it mid-run.
TRAIN_PROGRAM = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)  # the reduction order of the uninterrupted run's
import train

args, stall_after = json.loads(sys.argv[2]), int(sys.argv[3])
checkpoint = os.path.join(args["checkpoint_dir"], f"step-{stall_after}")

def stall_once_checkpointed(module, inputs):
    if torch.is_grad_enabled() and os.path.exists(checkpoint):
        time.sleep(3600)

torch.nn.modules.module.register_module_forward_pre_hook(stall_once_checkpointed)
train.train(**args)
"""


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_killed_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(
    tiny_model, tmp_path, one_thread, caplog
):
    args = train_args(tiny_model, tmp_path / "killed", tmp_path / "checkpoints", eval_every=5)
    killed = subprocess.Popen(
        [sys.executable, "-c", TRAIN_PROGRAM, str(REPO / "scripts"), json.dumps(args), "8"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    expected = train.train(**train_args(tiny_model, tmp_path / "uninterrupted", eval_every=5))
    checkpoint, older = tmp_path / "checkpoints" / "step-8", tmp_path / "checkpoints" / "step-4"
    deadline = time.monotonic() + 120
    while (not checkpoint.exists() or older.exists()) and killed.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert checkpoint.exists(), killed.stdout.read()
    # Nothing that looks finished: no adapter, no metrics, no half-written checkpoint left over.
    assert not (tmp_path / "killed" / "adapter").exists()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-8"]

    with caplog.at_level("INFO", logger="loranotes.train"), counted_evaluations() as evaluations:
        resumed = train.train(**args)  # the rerun: everything it knows comes from the checkpoint
    assert f"resuming from {checkpoint}: 8 of 12 steps done" in caplog.messages
    assert len(evaluations) == 2  # steps 10 and 12; before training and step 5: from the checkpoint

    columns = ["step", "loss", "token_accuracy", "lr", "grad_norm", "eval_loss", "eval_accuracy"]
    resumed_log = pd.read_csv(tmp_path / "killed" / "train_log.csv")[columns]
    expected_log = pd.read_csv(tmp_path / "uninterrupted" / "train_log.csv")[columns]
    pd.testing.assert_frame_equal(resumed_log, expected_log, check_exact=False, rtol=0, atol=1e-6)
    assert list(resumed_log.dropna()["step"]) == [5, 10, 12]
    for key in ("final_train_loss", "last_step_loss", "eval_loss_before", "eval_loss_after",
                "eval_loss_after_se", "train_examples_seen"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6)
    assert not (tmp_path / "checkpoints").exists()  # a finished run cleans up after itself


# Runs the training of main(snakemake) (as the train rule does, log file included) in a fresh
# process that sends itself `signal` while step `at_step` is under way (at its first training
# forward pass), as SLURM does ahead of a time limit or a user with Ctrl-C.
SIGNALLED_PROGRAM = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from transformers import PreTrainedModel
import train
from errors import configure_logging
from types import SimpleNamespace

args, at_step, signal_name, log_file = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
configure_logging(SimpleNamespace(log=[log_file], rule="train", wildcards=[]))
forwards = []

def signal_during_step(module, inputs):
    # the decoder (under the output layer): once per training forward pass
    if torch.is_grad_enabled() and isinstance(module, PreTrainedModel) and module.get_output_embeddings() is None:
        forwards.append(1)
        if len(forwards) == (at_step - 1) * args["training"]["grad_accum"] + 1:
            os.kill(os.getpid(), getattr(signal, signal_name))

torch.nn.modules.module.register_module_forward_pre_hook(signal_during_step)
train.main = train.entry_point(lambda _: train.train(**args))
train.main(None)
"""


def run_signalled(tiny_model, args, at_step, signal_name, log_file):
    return subprocess.run(
        [sys.executable, "-c", SIGNALLED_PROGRAM, str(REPO / "scripts"), json.dumps(args),
         str(at_step), signal_name, str(log_file)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("signal_name, exit_code", [("SIGTERM", 1)])
def test_a_stop_signal_checkpoints_the_step_and_the_rerun_ends_like_an_uninterrupted_run(
    tiny_model, tmp_path, one_thread, signal_name, exit_code
):
    # checkpoint_every 0: no periodic checkpoint, so whatever resumes is the stop's own
    args = train_args(tiny_model, tmp_path / "stopped", tmp_path / "checkpoints", eval_every=5,
                      checkpoint_every=0)
    log_file = tmp_path / "train.log"
    stopped = run_signalled(tiny_model, args, 7, signal_name, log_file)

    assert stopped.returncode == exit_code, stopped.stderr
    message = f"loranotes: stopped at step 7 by {signal_name}; checkpoint saved; rerun to resume"
    assert stopped.stderr.strip().splitlines()[-1] == message, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-7"]
    assert not (tmp_path / "stopped" / "adapter").exists()
    first_log = log_file.read_text()
    assert "eval loss before training" in first_log and first_log.rstrip().endswith(message)

    # The rerun, as Snakemake starts it: a fresh log file (Snakemake deletes the old one).
    log_file.unlink()
    rerun = subprocess.run(
        [sys.executable, "-c", SIGNALLED_PROGRAM, str(REPO / "scripts"), json.dumps(args),
         "0", signal_name, str(log_file)], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    expected = train.train(**train_args(tiny_model, tmp_path / "uninterrupted", eval_every=5,
                                        checkpoint_every=0))

    columns = ["step", "loss", "token_accuracy", "lr", "grad_norm", "eval_loss", "eval_accuracy"]
    resumed_log = pd.read_csv(tmp_path / "stopped" / "train_log.csv")[columns]
    expected_log = pd.read_csv(tmp_path / "uninterrupted" / "train_log.csv")[columns]
    pd.testing.assert_frame_equal(resumed_log, expected_log, check_exact=False, rtol=0, atol=1e-6)
    resumed = json.loads((tmp_path / "stopped" / "metrics.json").read_text())
    for key in ("final_train_loss", "eval_loss_before", "eval_loss_after", "train_examples_seen"):
        assert resumed[key] == pytest.approx(expected[key], abs=1e-6)
    adapter = "adapter/adapter_model.safetensors"
    assert (tmp_path / "stopped" / adapter).read_bytes() == \
        (tmp_path / "uninterrupted" / adapter).read_bytes()
    # The job's log tells the whole run: the stopped part, then where it resumed.
    text = log_file.read_text()
    # (the checkpoint has the log up to its writing; the stop's last line came after)
    assert text.startswith(first_log.removesuffix(message + "\n"))
    assert f"stopping at step 7 ({signal_name}): saving its checkpoint" in text
    assert "resumed at step 7; the lines above are from the run that stopped" in text
    assert "resuming from " in text and "7 of 12 steps done" in text
    assert "step 12/12  eval loss" in text
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    stale = tmp_path / "checkpoints" / "step-4"
    stale.mkdir(parents=True)
    (stale / "progress.json").write_text(json.dumps({"fingerprint": "other settings", "step": 4}))
    (tmp_path / "checkpoints" / "step-8.partial").mkdir()  # a write cut short: never complete
    assert latest_checkpoint(tmp_path / "checkpoints", "these settings") is None
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# 3. Rerun only what changed

def run_files(variant, seeds, files=("adapter", "train_log.csv", "metrics.json", "tracking.json")):
    return {f"results/variants/{variant}/seed-{seed}/{file}" for seed in seeds for file in files}


def samples_after(*variants, seed=0):
    return {f"results/variants/{variant}/seed-{seed}/samples_after.json" for variant in variants}


V2_RUN = run_files("v2", (0, 1)) | samples_after("v2")
AGGREGATES = {"results/metrics.csv", "results/summary.csv", "results/comparisons.csv", "results/sweeps.csv",
              "results/plots/all_variants.png", "results/report.md"}
GENERATION = {"results/samples/before/tiny-qwen3__none.json"} | samples_after("v1", "v2")


def set_seeds(seeds):
    return lambda config: config["training"].update(seeds=seeds)


CHANGES = {
    "nothing": (lambda c: None, set()),
    "v2 training": (lambda c: c["variants"]["v2"]["training"].update(lr=3.0e-2),
                    V2_RUN | AGGREGATES),
    "v2 lora": (lambda c: c["variants"]["v2"].update(lora={"r": 2}), V2_RUN | AGGREGATES),
    "v2 quantization": (
        lambda c: c["variants"]["v2"].update(quantization="nf4"),
        V2_RUN | AGGREGATES | {"results/samples/before/tiny-qwen3__nf4.json"},  # a new base sample
    ),
    "prompts": (lambda c: c["prompts"].append("Say hello."), GENERATION | {"results/report.md"}),
    "generation": (lambda c: c["generation"].update(max_new_tokens=5),
                   GENERATION | {"results/report.md"}),
    # a new seed trains only its own runs; the others' settings (their params) are unchanged
    "a seed added": (set_seeds([0, 1, 2]), run_files("v1", (2,)) | run_files("v2", (2,)) | AGGREGATES),
    "a seed removed": (set_seeds([0]), AGGREGATES),
    # the "after" samples are the first seed's: without seed 0, seed 1 answers the prompts
    "the first seed removed": (set_seeds([1]), AGGREGATES | samples_after("v1", "v2", seed=1)),
}


def pending_outputs(workdir, configfile):
    """The output files a run with this config would (re)create, from `snakemake -n --summary`."""
    summary = run_snakemake(workdir, "-n", "--summary", "--configfile", configfile).stdout
    rows = [line.split("\t") for line in summary.splitlines() if line.count("\t") == 5]
    return {row[0] for row in rows[1:] if row[5] == "update pending"}


@pytest.mark.parametrize("change", CHANGES)
def test_a_change_reruns_only_what_it_affects(tiny_run, change):
    edit, expected = CHANGES[change]
    config = tiny_config()
    edit(config)
    assert pending_outputs(tiny_run, write_config(tiny_run, config, "changed.yaml")) == expected


def test_a_changed_report_template_reruns_only_the_report(tiny_run):
    template = tiny_run / "report" / "report.md.j2"
    text, stat = template.read_text(), template.stat()
    template.write_text(text + "\nEdited.\n")
    try:
        assert pending_outputs(tiny_run, "tiny.yaml") == {"results/report.md"}
    finally:  # leave the run as it was for the other tests
        template.write_text(text)
        os.utime(template, ns=(stat.st_atime_ns, stat.st_mtime_ns))


# ---------------------------------------------------------------------------------------------
# 4. Safe by default

def test_safe_by_default(tiny_run):
    # A hub token in the environment never reaches a log, a result or Snakemake's own records.
    for directory in ("results", ".snakemake"):
        for path in (tiny_run / directory).rglob("*"):
            assert not path.is_file() or FAKE_TOKEN.encode() not in path.read_bytes(), path
    # Models and adapters are safetensors only: nothing that unpickles code when loaded.
    weight_suffixes = {".safetensors", ".bin", ".pt", ".pth", ".pkl"}
    weights = [p for p in (tiny_run / "results").rglob("*") if p.suffix in weight_suffixes]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert not (tiny_run / "results" / "checkpoints").exists()
    # Remote code is off unless a model entry turns it on.
    models = resolve_config(tiny_config())["models"]
    assert all(model["trust_remote_code"] is False for model in models.values())
    # Model-generated text is shown verbatim, but cannot close its code block or become HTML.
    generated = "```\n</pre><script>alert(1)</script>\n# not a heading\n````"
    tokens = MarkdownIt().parse(fence(generated))
    assert [t.type for t in tokens] == ["fence"] and tokens[0].content == generated + "\n"


def test_errors_never_show_a_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_aDifferentFakeToken42")
    message = str(LoranotesError("login failed with hf_aDifferentFakeToken42 and hf_another123456"))
    assert "hf_" not in message and message.count("<redacted>") == 2


def test_out_of_gpu_memory_stops_with_the_step_and_what_to_change(tiny_model, tmp_path, caplog):
    def out_of_memory_at_step_3(call, output):
        if call == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    args = train_args(tiny_model, tmp_path / "out", tmp_path / "checkpoints",
                      grad_accum=1, checkpoint_every=2, gradient_checkpointing=False)
    with after_training_forward(out_of_memory_at_step_3), pytest.raises(train.TrainingError) as error:
        train.train(**args)
    message = str(error.value)
    assert message.startswith("out of GPU memory at step 3 (")
    assert "tokens in the batch): set training.gradient_checkpointing: auto (or true)" in message
    assert "lower training.batch_size or training.max_length; or use quantization: nf4" in message
    assert "\n" not in message
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]
    # with the advice taken, the rerun resumes where the checkpoint left off
    args["training"]["gradient_checkpointing"] = True
    with caplog.at_level(logging.INFO, logger="loranotes.train"):
        metrics = train.train(**args)
    assert "resuming from" in caplog.text and "2 of 12 steps done" in caplog.text
    assert metrics["steps"] == 12


# ---------------------------------------------------------------------------------------------
# 5. One run per directory; files readable by the group; readable inputs

def test_the_run_lock_refuses_a_live_holder_and_replaces_a_dead_one(tmp_path):
    import run_lock

    lock = tmp_path / "loranotes.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": holder.pid, "host": os.uname().nodename, "started": "10:00",
                  "process_start": run_lock.process_start(holder.pid), "command": "snakemake all"}
        lock.write_text(json.dumps(record))
        with pytest.raises(run_lock.RunLockError, match=rf"pid {holder.pid} on .*: `snakemake "
                           r"all`\); two runs would write the same outputs\. .*kill"):
            run_lock.acquire("snakemake again", lock)
        # another process with the same pid later (pid reuse) is not the holder
        lock.write_text(json.dumps({**record, "process_start": record["process_start"] + 1}))
        assert run_lock.active_holder(lock) is None
        # a run on another host cannot be checked from here: the message says where to look
        lock.write_text(json.dumps({**record, "host": "node7"}))
        with pytest.raises(run_lock.RunLockError, match=rf"there, `ps -p {holder.pid}` shows "
                           rf"whether it runs; if it does not, delete {lock}"):
            run_lock.acquire("snakemake again", lock)
        lock.write_text(json.dumps(record))
    finally:
        holder.kill()
        holder.wait()
    assert run_lock.acquire("snakemake again", lock)["pid"] == holder.pid  # stale: replaced
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    run_lock.release(lock)
    assert not lock.exists()


def test_an_unreadable_dataset_source_is_named(tmp_path, monkeypatch):
    from prepare_data import DataError, dataset_source

    source = tmp_path / "rows.jsonl"
    source.write_text("{}\n")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00.jsonl").write_text("{}\n")
    # as root every file is readable: the permission check is what is replaced
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DataError, match=rf"dataset.source: {source} exists but this user may not "
                       r"read it \(permission denied\); make it readable"):
        dataset_source(str(source))
    with pytest.raises(DataError, match="may not list the directory it"):
        dataset_source(str(tmp_path / "shards"))


def test_unchanged_bytes_keep_the_file_and_its_time(tmp_path):
    from outputs import unless_unchanged

    path = tmp_path / "data.jsonl"
    path.write_text("same\n")
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    with unless_unchanged(path) as temporary:
        temporary.write_text("same\n")
    assert path.stat().st_mtime_ns == 1_000_000_000 and len(list(tmp_path.iterdir())) == 1
    with unless_unchanged(path) as temporary:
        temporary.write_text("changed\n")
    assert path.read_text() == "changed\n" and path.stat().st_mtime_ns > 1_000_000_000
    with pytest.raises(RuntimeError), unless_unchanged(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError("the job failed while writing")
    assert path.read_text() == "changed\n" and len(list(tmp_path.iterdir())) == 1
