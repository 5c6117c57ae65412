"""The tokenize step (scripts/tokenize_data.py): what became of each conversation, counted
exactly (kept whole, shortened at a turn boundary, dropped), and what stats.json and the log say.
"""

import json
import logging

import pytest

from bundled_sample import make_conversations
from chat_format import IGNORE_INDEX, PromptFormat, tokenize_conversation
from chat_styles import style_tokenizer, train_byte_level_bpe
from modeling import load_tokenizer
from prepare_data import load_rows, prepare
from tokenize_data import main as tokenize_main
from tokenize_data import tokenize_split
from test_masking import run_ends
from util import fake_snakemake, labelled_runs

SPLIT_KEYS = {"conversations_in", "kept_whole", "shortened", "dropped", "conversations", "truncated",
              "tokens", "assistant_tokens"}


def assert_counts_add_up(counts, frame):
    assert set(counts) >= SPLIT_KEYS
    assert counts["kept_whole"] + counts["shortened"] + counts["dropped"] == counts["conversations_in"]
    assert counts["conversations"] == counts["kept_whole"] + counts["shortened"] == len(frame)
    assert counts["shortened"] <= counts["truncated"] <= counts["conversations_in"]
    assert counts["tokens"] == sum(map(len, frame["input_ids"]))
    assert counts["assistant_tokens"] == sum(
        sum(label != IGNORE_INDEX for label in labels) for labels in frame["labels"])
    assert 0 < counts["assistant_tokens"] <= counts["tokens"]


@pytest.fixture(scope="module")
def ultrachat_train(shared_fixtures):
    train, _, _ = prepare(load_rows(str(shared_fixtures / "ultrachat_sample.jsonl")), 400, 50, 0)
    return train


@pytest.fixture(scope="module")
def stories_format(shared_fixtures):
    return PromptFormat(load_tokenizer(shared_fixtures / "stories260k"))


@pytest.mark.parametrize("max_length", [256, 512])
def test_real_conversations_are_kept_whole_shortened_at_a_turn_boundary_or_dropped(
    ultrachat_train, stories_format, max_length
):
    """Real UltraChat in stories260k's tokens (about 1,240 per conversation): every written
    conversation is either its full tokenization, or a start of it that ends right after an
    answer's end of turn, or (the first answer alone too long) exactly max_length tokens."""
    frame, counts = tokenize_split(stories_format, ultrachat_train, max_length)
    assert_counts_add_up(counts, frame)
    assert counts["shortened"] > 0 and counts["kept_whole"] + counts["dropped"] > 0
    eos = stories_format.tokenizer.eos_token_id
    full = {c["id"]: tokenize_conversation(stories_format, c["messages"], 10**6) for c in ultrachat_train}
    at_turn_boundary = 0
    for row in frame.itertuples():
        full_ids, full_labels, _ = full[row.id]
        ids, labels = list(row.input_ids), list(row.labels)
        assert ids == full_ids[: len(ids)] and labels == full_labels[: len(ids)]
        if len(ids) == len(full_ids):
            continue
        turn_ends = run_ends(full_labels)
        if ids[-1] == eos and labels[-1] == eos:  # ends with a whole answer and its end of turn
            at_turn_boundary += 1
            # and the next exchange would not have fit
            assert turn_ends[turn_ends.index(len(ids)) + 1] > max_length
        else:  # only the first answer, cut inside
            assert len(ids) == max_length and len(labelled_runs(ids, labels)) == 1 < len(turn_ends)
    assert at_turn_boundary > 0


def test_counts_on_real_conversations_at_256_tokens(ultrachat_train, stories_format):
    """The numbers behind the README: at 256 tokens, stories260k's 512-piece vocabulary makes
    most UltraChat first questions longer than the whole budget."""
    _, counts = tokenize_split(stories_format, ultrachat_train, 256)
    assert counts["conversations_in"] == 400 and counts["truncated"] == 400
    assert counts["dropped"] == 236 and counts["shortened"] == 164 and counts["kept_whole"] == 0


@pytest.fixture
def chatml_model_dir(tmp_path):
    """A tokenizer directory with a ChatML template whose turn ends in <|im_end|> while eos is
    <|endoftext|> (Qwen2.5's base tokenizers)."""
    rows = make_conversations(n=60, seed=1)
    bpe = train_byte_level_bpe([m["content"] for row in rows for m in row["messages"]])
    style_tokenizer(bpe, "chatml").save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def write_split(path, conversations):
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations), encoding="utf-8")
    return str(path)


def test_stats_json_and_the_log_say_what_became_of_each_conversation(tmp_path, chatml_model_dir, caplog):
    rows = make_conversations(n=30, seed=2)
    conversations = [{"id": row["prompt_id"], "messages": row["messages"]} for row in rows]
    long_question = {"id": "long", "messages": [
        {"role": "user", "content": "Tell me everything. " * 200},
        {"role": "assistant", "content": "No."},
    ]}
    out = tmp_path / "out"
    out.mkdir()
    snakemake = fake_snakemake(
        input={"train": write_split(tmp_path / "train.jsonl", [*conversations[:24], long_question]),
               "eval": write_split(tmp_path / "eval.jsonl", conversations[24:])},
        output={"train": str(out / "train.parquet"), "eval": str(out / "eval.parquet"),
                "stats": str(out / "stats.json")},
        params={"model": {"prompt_format": "chat_template", "trust_remote_code": False},
                "model_path": str(chatml_model_dir), "max_length": 160},
        log={"log": str(tmp_path / "tokenize.log")},
    )
    caplog.set_level(logging.INFO, logger="loranotes")
    tokenize_main(snakemake)
    stats = json.loads((out / "stats.json").read_text())
    assert set(stats) == {"prompt_format", "turn_end", "last_turn_end", "labels", "max_length", "train", "eval"}
    assert stats["turn_end"] == stats["last_turn_end"] == "<|im_end|>"
    assert stats["prompt_format"] == "tokenizer chat template" and stats["labels"] == "roles"
    train = stats["train"]
    assert set(train) == SPLIT_KEYS and stats["eval"]["conversations_in"] == 6
    assert train["conversations_in"] == 25 and train["dropped"] == 1  # the long question
    assert train["shortened"] > 0 and train["kept_whole"] > 0
    assert train["kept_whole"] + train["shortened"] + train["dropped"] == 25
    log = caplog.text
    assert "an assistant turn ends with '<|im_end|>', labelled so the model learns to stop" in log
    assert (f"train: 25 conversations: {train['kept_whole']} kept whole, {train['truncated']} truncated "
            f"to 160 tokens ({train['shortened']} shortened") in log
