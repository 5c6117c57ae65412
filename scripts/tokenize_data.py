"""Tokenize the train and eval splits for one (tokenizer, prompt format, max length).

Variants that share a model share this output (v1 and v2 of the seed both read Qwen3-4B's), so
each dataset is tokenized once. Output: parquet files with input_ids and labels (-100 on every
token that is not part of an assistant turn) and a stats.json the report quotes: per split, what
came in and what became of it (kept whole, shortened at a turn boundary, dropped), disjoint.
"""

import json
import logging

import pandas as pd

from chat_format import IGNORE_INDEX, PromptFormat, labels_unlike_roles, tokenize_conversation
from errors import configure_logging, entry_point
from modeling import load_tokenizer
from outputs import unless_unchanged
from prepare_data import DataError

log = logging.getLogger("loranotes.tokenize")


def read_conversations(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def tokenize_split(prompt_format, conversations, max_length):
    """Return (DataFrame[id, input_ids, labels], counts).

    counts: conversations_in = kept_whole + shortened + dropped; conversations (written) =
    kept_whole + shortened; truncated: those longer than max_length (shortened, or dropped when
    not even the first answer's prompt fit); tokens and assistant_tokens of what was written.
    With {% generation %} labels, unlike_roles counts the conversations whose labels differ from
    the role-based ones, and unlike_roles_example shows the first.
    """
    rows, truncated, shortened, dropped = [], 0, 0, 0
    unlike, example = 0, None
    for conversation in conversations:
        input_ids, labels, was_truncated = tokenize_conversation(
            prompt_format, conversation["messages"], max_length
        )
        truncated += was_truncated
        if prompt_format.generation_tags:
            difference = labels_unlike_roles(prompt_format, conversation["messages"])
            if difference:
                unlike += 1
                example = example or {"id": conversation["id"], "only_template": difference[0],
                                      "only_roles": difference[1]}
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1  # nothing to learn from: no assistant token within max_length
            continue
        shortened += was_truncated
        rows.append({"id": conversation["id"], "input_ids": input_ids, "labels": labels})
    frame = pd.DataFrame(rows, columns=["id", "input_ids", "labels"])
    counts = {
        "conversations_in": len(conversations),
        "kept_whole": len(frame) - shortened,
        "shortened": shortened,
        "dropped": dropped,
        "conversations": len(frame),
        "truncated": truncated,
        "tokens": int(frame["input_ids"].map(len).sum()),
        "assistant_tokens": int(frame["labels"].map(lambda ls: sum(l != IGNORE_INDEX for l in ls)).sum()),
    }
    if prompt_format.generation_tags:
        counts["unlike_roles"] = unlike
        counts["unlike_roles_example"] = example
    return frame, counts


def log_prompt_format(prompt_format):
    if prompt_format.fallback_reason:
        log.warning("prompt format: %s", prompt_format.describe())
    else:
        log.info("prompt format: %s", prompt_format.describe())
    if prompt_format.generation_tags:
        log.info("labels: the template's {%% generation %%} blocks")
    if not prompt_format.turn_end.strip():
        log.warning("the template renders nothing that closes an assistant turn: the model cannot "
                    "learn where an answer ends")
    else:
        last = (f" (the last turn: {prompt_format.last_turn_end!r})"
                if prompt_format.last_turn_end != prompt_format.turn_end else "")
        log.info("an assistant turn ends with %r%s, labelled so the model learns to stop",
                 prompt_format.turn_end, last)


def log_counts(split, counts, max_length):
    log.info("%s: %d conversations: %d kept whole, %d truncated to %d tokens (%d shortened to "
             "their leading whole exchanges or first answer, %d dropped: no assistant token left); "
             "%d written, %s tokens (%s on assistant turns)",
             split, counts["conversations_in"], counts["kept_whole"], counts["truncated"],
             max_length, counts["shortened"], counts["dropped"], counts["conversations"],
             f"{counts['tokens']:,}", f"{counts['assistant_tokens']:,}")
    if counts.get("unlike_roles"):
        example = counts["unlike_roles_example"]
        log.warning("%s: in %d of %d conversations the {%% generation %%} labels differ from "
                    "labels by message role; first, %s: only the template labels %r, only roles %r",
                    split, counts["unlike_roles"], counts["conversations_in"], example["id"],
                    example["only_template"], example["only_roles"])


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    model = snakemake.params.model
    max_length = snakemake.params.max_length
    tokenizer = load_tokenizer(snakemake.params.model_path, model["trust_remote_code"])
    prompt_format = PromptFormat(tokenizer, model["prompt_format"])
    log_prompt_format(prompt_format)
    stats = {
        "prompt_format": prompt_format.describe(),
        "turn_end": prompt_format.turn_end,
        "last_turn_end": prompt_format.last_turn_end,
        "labels": prompt_format.labels,
        "max_length": max_length,
    }
    for split in ("train", "eval"):
        frame, counts = tokenize_split(prompt_format, read_conversations(getattr(snakemake.input, split)), max_length)
        log_counts(split, counts, max_length)
        if frame.empty:
            raise DataError(f"tokenize: no {split} conversation keeps an assistant token "
                            f"within max_length={max_length}; raise max_length")
        # Same tokens as before: the file is left as it was (unless_unchanged).
        with unless_unchanged(getattr(snakemake.output, split)) as temporary:
            frame.to_parquet(temporary)
        stats[split] = counts
    with unless_unchanged(snakemake.output.stats) as temporary:
        temporary.write_text(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
