"""Tokenize the train and eval splits for one (tokenizer, prompt format, max length).

Variants that share a model share this output (v1 and v2 of the seed both read Qwen3-4B's), so
each dataset is tokenized once. Output: parquet files with input_ids and labels (-100 on every
token that is not part of an assistant turn) and a stats.json the report quotes.
"""

import json
import logging

import pandas as pd

from chat_format import IGNORE_INDEX, PromptFormat, tokenize_conversation
from errors import configure_logging, entry_point
from modeling import load_tokenizer
from prepare_data import DataError

log = logging.getLogger("loranotes.tokenize")


def read_conversations(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tokenize_split(prompt_format, conversations, max_length):
    """Return (DataFrame[input_ids, labels], counts)."""
    rows, truncated, no_target = [], 0, 0
    for conversation in conversations:
        input_ids, labels, was_truncated = tokenize_conversation(
            prompt_format, conversation["messages"], max_length
        )
        truncated += was_truncated
        if all(label == IGNORE_INDEX for label in labels):
            no_target += 1  # truncation cut off every assistant token: nothing to learn from
            continue
        rows.append({"id": conversation["id"], "input_ids": input_ids, "labels": labels})
    frame = pd.DataFrame(rows, columns=["id", "input_ids", "labels"])
    counts = {
        "conversations": len(frame),
        "truncated": truncated,
        "dropped_no_assistant_tokens": no_target,
        "tokens": int(frame["input_ids"].map(len).sum()),
        "assistant_tokens": int(frame["labels"].map(lambda ls: sum(l != IGNORE_INDEX for l in ls)).sum()),
    }
    return frame, counts


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    model = snakemake.params.model
    tokenizer = load_tokenizer(snakemake.params.model_path, model["trust_remote_code"])
    prompt_format = PromptFormat(tokenizer, model["prompt_format"])
    if prompt_format.fallback_reason:
        log.warning("prompt format: %s", prompt_format.describe())
    stats = {"prompt_format": prompt_format.describe(), "max_length": snakemake.params.max_length}
    for split in ("train", "eval"):
        frame, counts = tokenize_split(
            prompt_format, read_conversations(snakemake.input[split]), snakemake.params.max_length
        )
        if frame.empty:
            raise DataError(f"tokenize: no {split} conversation keeps an assistant token "
                            f"within max_length={snakemake.params.max_length}; raise max_length")
        frame.to_parquet(snakemake.output[split])
        stats[split] = counts
        log.info("%s: %d conversations, %d tokens (%d on assistant turns), %d truncated to %d, "
                 "%d dropped (no assistant token left)", split, counts["conversations"],
                 counts["tokens"], counts["assistant_tokens"], counts["truncated"],
                 snakemake.params.max_length, counts["dropped_no_assistant_tokens"])
    with open(snakemake.output.stats, "w") as f:
        json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
