"""What a training run records, on a 1-layer Qwen3 built in-process: held-out eval during
training (every training.eval_every steps and at the last, which is the eval after training),
the counts and standard errors in metrics.json, and gradient accumulation that trains like one
large batch."""

import json
import math
import statistics

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import train
from batches import batches_forever, read_tokenized
from conftest import REPO
from experiment_config import ConfigError, validate_config
from modeling import load_base_model, load_tokenizer
from run_metrics import METRIC_KEYS, ratio_standard_error, summarize
from step import evaluate
from test_robustness import counted_evaluations, tiny_model, train_args  # noqa: F401  (fixture)


def run(tiny_model, out_dir, **training):
    metrics = train.train(**train_args(tiny_model, out_dir, **training))
    return metrics, pd.read_csv(out_dir / "train_log.csv")


@pytest.mark.parametrize("eval_every, eval_steps", [(5, [5, 10, 12]), (0, [12])])
def test_held_out_eval_at_every_eval_every_th_step_and_the_last(tiny_model, tmp_path, eval_every,
                                                               eval_steps):
    with counted_evaluations() as evaluations:
        metrics, steps = run(tiny_model, tmp_path, eval_every=eval_every)
    evaluated = steps.dropna(subset=["eval_loss"])
    assert list(evaluated["step"]) == eval_steps
    assert steps["eval_accuracy"].notna().tolist() == steps["eval_loss"].notna().tolist()
    # the last step's eval is the eval after training, computed once
    last = evaluated.iloc[-1]
    assert (metrics["eval_loss_after"], metrics["eval_accuracy_after"]) == (
        pytest.approx(last["eval_loss"], abs=1e-9), pytest.approx(last["eval_accuracy"], abs=1e-9))
    assert len(evaluations) == 1 + len(eval_steps)  # and the one before training
    assert metrics["eval_loss_before"] != pytest.approx(last["eval_loss"], abs=1e-6)


def test_metrics_say_how_much_data_and_how_sure(tiny_model, tmp_path):
    metrics, steps = run(tiny_model, tmp_path)  # 12 steps of 2 micro-batches of 2
    assert list(json.loads((tmp_path / "metrics.json").read_text())) == METRIC_KEYS
    evaluation = read_tokenized(tiny_model / "eval.parquet")
    assert metrics["eval_conversations"] == len(evaluation)
    assert metrics["eval_target_tokens"] == sum(
        sum(label != -100 for label in labels[1:]) for _, labels in evaluation)
    assert metrics["train_conversations"] == len(read_tokenized(tiny_model / "train.parquet"))
    assert metrics["train_examples_seen"] == 12 * 2 * 2 == steps["conversations"].sum()
    assert 0 < metrics["eval_loss_after_se"] < metrics["eval_loss_after"]
    tail = steps["loss"].tail(2)  # the last 10% of 12 steps
    assert metrics["final_train_loss_se"] == pytest.approx(tail.std() / math.sqrt(2))


def test_conversations_seen_with_a_token_budget_follow_the_batches(tiny_model, tmp_path):
    metrics, steps = run(tiny_model, tmp_path, batch_tokens=200, steps=6)  # batch_size 2
    batches = batches_forever(read_tokenized(tiny_model / "train.parquet"), 2, 0, 200)
    drawn = [len(next(batches)) for _ in range(6 * 2)]
    assert metrics["train_examples_seen"] == sum(drawn) == steps["conversations"].sum()
    assert metrics["train_examples_seen"] != 6 * 2 * 2  # the budget, not batch_size, decides


def test_eval_standard_error_matches_the_conversations_one_by_one(tiny_model):
    device = torch.device("cpu")
    model = load_base_model(str(tiny_model / "model"), "none", device)
    pad_id = load_tokenizer(tiny_model / "model").pad_token_id
    examples = read_tokenized(tiny_model / "eval.parquet")
    together = evaluate(model, examples, 3, pad_id, device)
    alone = [evaluate(model, [example], 1, pad_id, device) for example in examples]
    sums = torch.tensor([one.loss * one.target_tokens for one in alone], dtype=torch.float64)
    counts = torch.tensor([one.target_tokens for one in alone], dtype=torch.float64)
    mean, n = sums.sum() / counts.sum(), len(examples)
    by_hand = math.sqrt(((sums - mean * counts) ** 2).sum() / (n * (n - 1))) / counts.mean()
    assert together.conversations == n and together.target_tokens == counts.sum()
    assert together.loss == pytest.approx(float(mean), rel=1e-5)
    assert together.loss_se == pytest.approx(by_hand, rel=1e-4)


def test_ratio_standard_error_on_known_numbers():
    # m = 15 / 6 = 2.5; residuals -0.5, -1, 1.5; sqrt(3.5 / (3 * 2)) / mean count 2
    assert ratio_standard_error([2, 4, 9], [1, 2, 3]) == pytest.approx(math.sqrt(3.5 / 6) / 2)
    # equal counts: the usual standard error of the conversations' mean losses
    losses = [2.0, 2.6, 1.7, 3.1, 2.2]
    assert ratio_standard_error([7 * loss for loss in losses], [7] * 5) == pytest.approx(
        statistics.stdev(losses) / math.sqrt(5))
    assert ratio_standard_error([2.0, 0.0], [4, 0]) is None  # one conversation with targets


def test_final_train_loss_standard_error_of_the_last_tenth():
    def steps(losses):
        return [{"step": i + 1, "loss": loss, "token_accuracy": 0.5, "seconds": 0.1, "tokens": 10,
                 "conversations": 2, "attention_flops": 0} for i, loss in enumerate(losses)]

    evaluation = {"loss": 2.0, "accuracy": 0.1, "loss_se": 0.1, "target_tokens": 9, "conversations": 3}
    params = {"flops_per_token": 1.0}
    metrics = summarize(steps([5.0] * 18 + [1.0, 3.0]), [evaluation] * 2, {}, params)
    assert (metrics["final_train_loss"], metrics["final_train_loss_se"]) == (2.0, pytest.approx(1.0))
    assert summarize(steps([5.0] * 9 + [1.0]), [evaluation] * 2, {}, params)["final_train_loss_se"] is None


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accum_2_of_batch_4_trains_like_batch_8(tiny_model, tmp_path, packing):
    """The same conversations per step (the first epoch's order is the same), the same steps."""
    common = {"steps": 3, "packing": packing, "checkpoint_every": 0}
    lora = {"dropout": 0.0}  # dropout masks depend on the batch layout
    runs = {}
    for name, batch_size, grad_accum in (("accumulated", 4, 2), ("one batch", 8, 1)):
        args = train_args(tiny_model, tmp_path / name, batch_size=batch_size,
                          grad_accum=grad_accum, **common)
        args["lora"].update(lora)
        train.train(**args)
        runs[name] = (pd.read_csv(tmp_path / name / "train_log.csv"),
                      load_file(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    (accumulated, accumulated_weights), (whole, whole_weights) = runs.values()
    columns = ["loss", "token_accuracy", "grad_norm", "tokens", "conversations"]
    pd.testing.assert_frame_equal(accumulated[columns], whole[columns], check_exact=False,
                                  rtol=0, atol=1e-5)
    for name, weight in whole_weights.items():
        assert torch.allclose(accumulated_weights[name], weight, atol=1e-5), name


@pytest.mark.parametrize("value, message", [
    (-1, "training.eval_every: -1 is less than the minimum of 0"),
    (2.5, "training.eval_every: expected integer, got 2.5"),
])
def test_a_bad_eval_every_is_a_config_error(value, message):
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["training"]["eval_every"] = value
    with pytest.raises(ConfigError, match=message):
        validate_config(config, REPO / "schemas" / "config.schema.yaml", "config.yaml")


def test_metrics_csv_has_a_column_per_metric_key_and_keeps_unknown_ones(tmp_path):
    from collect_metrics import SETTING_COLUMNS, collect

    variant = {"name": "v1", "title": "baseline", "model": "m", "quantization": "none",
               "lora": {"r": 1, "target_modules": ["q_proj"]}}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"steps": 3, "final_train_loss": 1.5, "git_commit": "abc123"}))
    frame = collect([{"variant": variant, "seed": 0}], [path])
    assert list(frame.columns) == [*SETTING_COLUMNS, *METRIC_KEYS, "git_commit"]
    assert frame.loc[0, "git_commit"] == "abc123"  # written by other code: kept, not dropped
    assert frame.loc[0, "final_train_loss"] == 1.5
    assert math.isnan(frame.loc[0, "eval_loss_after_se"])  # an older file: the key is empty
