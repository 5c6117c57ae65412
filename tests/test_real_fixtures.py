"""The pipeline's own functions on real material: 1000 UltraChat conversations and stories260k,
a trained tiny Llama without a chat template (see ../shared/fixtures/README.md).

data -> tokens (the seed format stands in for the missing template, truncated to 256 tokens) ->
LoRA training, unquantized and nf4, must lower the held-out loss of a real model.
"""

import pytest
import torch
from peft import PeftModel

from chat_format import PromptFormat, tokenize_conversation
from modeling import load_base_model, load_tokenizer
from prepare_data import load_rows, prepare
from tokenize_data import tokenize_split
from batches import read_tokenized
from step import evaluate
from train import train
from util import labelled_runs
from experiment_config import LORA_DEFAULTS, TRAINING_DEFAULTS

MAX_LENGTH = 256
TRAINING = {**TRAINING_DEFAULTS, "steps": 40, "lr": 1.0e-2, "batch_size": 4,
            "max_length": MAX_LENGTH, "device": "cpu", "seed": 0}
LORA = {**LORA_DEFAULTS, "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def stories(shared_fixtures):
    return shared_fixtures / "stories260k"


@pytest.fixture(scope="module")
def ultrachat(shared_fixtures):
    return shared_fixtures / "ultrachat_sample.jsonl"


@pytest.fixture(scope="module")
def prompt_format(stories):
    return PromptFormat(load_tokenizer(stories), "chat_template")


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, ultrachat, prompt_format):
    """Train and eval parquet files, as the tokenize rule writes them."""
    train_set, eval_set, _ = prepare(load_rows(str(ultrachat)), num_train=160, num_eval=60, seed=0)
    out = tmp_path_factory.mktemp("stories260k_tokens")
    for split, conversations in (("train", train_set), ("eval", eval_set)):
        frame, counts = tokenize_split(prompt_format, conversations, MAX_LENGTH)
        assert counts["truncated"] > 0 and counts["conversations"] >= 20, counts
        frame.to_parquet(out / f"{split}.parquet")
    return out


def test_every_real_conversation_is_usable(ultrachat):
    lines = [line for line in ultrachat.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_set, eval_set, stats = prepare(load_rows(str(ultrachat)), 800, 100, 0)
    assert stats["rows"] == stats["usable"] == len(lines) and stats["skipped"] == {}
    assert (len(train_set), len(eval_set)) == (800, 100)


def test_real_model_falls_back_to_seed_format(prompt_format):
    assert prompt_format.kind == "seed" and prompt_format.fallback_reason


def test_masking_on_real_conversations(ultrachat, prompt_format):
    tokenizer = prompt_format.tokenizer
    rows = [row["messages"] for _, (_, row) in zip(range(40), load_rows(str(ultrachat)))]
    for messages in rows:
        input_ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
        runs = [tokenizer.decode(run).lstrip(" ") for run in labelled_runs(input_ids, labels)]
        assert runs == [m["content"] + tokenizer.eos_token for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_lora_lowers_the_eval_loss_of_a_real_model(tmp_path, stories, tokenized, quantization):
    metrics = train(
        model_path=str(stories), quantization=quantization,
        train_path=tokenized / "train.parquet", eval_path=tokenized / "eval.parquet",
        training=TRAINING, lora=LORA, out_dir=tmp_path,
    )
    assert metrics["steps"] == TRAINING["steps"] and metrics["random_init"] is False
    assert metrics["eval_loss_after"] < 0.9 * metrics["eval_loss_before"], metrics
    assert metrics["final_train_loss"] < metrics["eval_loss_before"]

    # The saved adapter is the trained one: reloaded on the base model it scores the same.
    device = torch.device("cpu")
    model = PeftModel.from_pretrained(load_base_model(str(stories), quantization, device),
                                      tmp_path / "adapter")
    tokenizer = load_tokenizer(stories)
    reloaded = evaluate(model, read_tokenized(tokenized / "eval.parquet"),
                        TRAINING["eval_batch_size"], tokenizer.pad_token_id, device)
    assert reloaded.loss == pytest.approx(metrics["eval_loss_after"], rel=1e-3)
