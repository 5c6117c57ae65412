"""Load conversations, check them, and split them into train and held-out eval sets.

Sources: the bundled sample (a JSONL file the `bundled_sample` rule writes), a local
.jsonl/.json/.parquet file, or a Hugging Face Hub dataset id + split. Both UltraChat row schemas
are accepted:
- ultrachat_200k: {"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}
- original UltraChat: {"id", "data": [user, assistant, user, ...]}

Rows that cannot be trained on are skipped and counted by reason (the counts go to the log, to
data/stats.json and into the report); nothing is dropped silently. The split is deterministic
given the seed, and the eval set is drawn first, so changing num_train keeps the same eval set.
"""

import json
import logging
import random
from collections import Counter
from pathlib import Path

from errors import LoranotesError, configure_logging, entry_point

log = logging.getLogger("loranotes.prepare_data")

ROLES = {"system", "user", "assistant"}


class DataError(LoranotesError, ValueError):
    """The dataset cannot be used at all (missing, unreadable, empty after checks)."""


def load_rows(source, split="train_sft"):
    """Yield (where, row) pairs; `where` names the file and line for messages."""
    path = Path(source)
    if path.suffix in {".jsonl", ".json", ".parquet"} and not path.exists():
        raise DataError(f"dataset.source: {source} does not exist")
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{source}:{line_number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    yield where, InvalidJSON(str(error))
    elif path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):  # {"data": [...]} / {"train": [...]} style wrappers
            rows = rows.get(split) or rows.get("data") or rows.get("rows")
        if not isinstance(rows, list):
            raise DataError(f"{source}: expected a JSON list of conversations")
        for index, row in enumerate(rows):
            yield f"{source}[{index}]", row
    elif path.suffix == ".parquet":
        import pandas as pd

        for index, row in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{source} row {index}", _plain(row)
    else:
        yield from load_hub_rows(source, split)


def load_hub_rows(source, split):
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # offline, unknown id, unknown split: one line, not a traceback
        raise DataError(
            f"dataset.source: could not load hub dataset '{source}' split '{split}' "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Check the id and split, your network and HF_TOKEN, or point source at a local "
            ".jsonl/.json/.parquet file."
        ) from error
    for index, row in enumerate(dataset):
        yield f"{source}[{split}] row {index}", row


def _plain(value):
    """numpy arrays from parquet to lists, recursively."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


class InvalidJSON:
    def __init__(self, error):
        self.error = error


def to_messages(row):
    """The row's messages as [{"role", "content"}], or raise ValueError with the reason to skip."""
    if isinstance(row, InvalidJSON):
        raise ValueError("invalid JSON")
    if not isinstance(row, dict):
        raise ValueError("not an object")
    if isinstance(row.get("messages"), list):
        messages = row["messages"]
        if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError("messages without role/content")
    elif isinstance(row.get("data"), list):
        # Original UltraChat: a plain list of turns, starting with the user.
        messages = [
            {"role": "user" if index % 2 == 0 else "assistant", "content": content}
            for index, content in enumerate(row["data"])
        ]
    else:
        raise ValueError("neither schema (no 'messages' or 'data' list)")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    check_conversation(messages)
    return messages


def check_conversation(messages):
    roles = [m["role"] for m in messages]
    unknown = set(roles) - ROLES
    if unknown:
        raise ValueError(f"unknown role {sorted(unknown)[0]!r}")
    if any(not isinstance(m["content"], str) or not m["content"].strip() for m in messages):
        raise ValueError("empty content")
    # System messages are kept as context (never trained on), but only at the start.
    turns = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in turns:
        raise ValueError("system message after the start")
    if "assistant" not in turns:
        raise ValueError("no assistant turn")
    expected = ["user", "assistant"] * len(turns)
    if turns != expected[: len(turns)]:
        raise ValueError("turns do not alternate user/assistant")


def prepare(rows, num_train, num_eval, seed):
    """Return (train, eval, stats). Each conversation is {"id", "messages"}."""
    conversations, skipped, examples = [], Counter(), {}
    total = 0
    for where, row in rows:
        total += 1
        try:
            messages = to_messages(row)
        except ValueError as reason:
            skipped[str(reason)] += 1
            examples.setdefault(str(reason), where)
            continue
        # A parquet file that mixes both schemas fills the other schema's id column with NaN.
        ids = [row.get(key) for key in ("prompt_id", "id") if isinstance(row.get(key), (str, int))]
        conversation_id = ids[0] if ids else where
        conversations.append({"id": str(conversation_id), "messages": messages})
    if not conversations:
        raise DataError(
            f"no usable conversations out of {total} rows (skipped: {dict(skipped) or 'none'}). "
            "Check dataset.source and the row schema (see README, 'Data')."
        )
    random.Random(seed).shuffle(conversations)
    eval_set = conversations[:num_eval]
    train_set = conversations[num_eval : num_eval + num_train]
    if not train_set:
        raise DataError(
            f"only {len(conversations)} usable conversations, all taken by num_eval={num_eval}; "
            "lower dataset.num_eval or use more data"
        )
    stats = {
        "rows": total,
        "usable": len(conversations),
        "skipped": dict(skipped),
        "skipped_examples": examples,
        "train": len(train_set),
        "eval": len(eval_set),
        "requested_train": num_train,
        "requested_eval": num_eval,
    }
    return train_set, eval_set, stats


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    dataset = snakemake.params.dataset
    source = snakemake.input.get("bundled", dataset["source"])
    train_set, eval_set, stats = prepare(
        load_rows(source, dataset["split"]), dataset["num_train"], dataset["num_eval"], dataset["seed"]
    )
    write_jsonl(train_set, snakemake.output.train)
    write_jsonl(eval_set, snakemake.output.eval)
    Path(snakemake.output.stats).write_text(json.dumps(stats, indent=2) + "\n")
    log.info("read %d rows from %s: %d usable", stats["rows"], source, stats["usable"])
    for reason, count in stats["skipped"].items():
        log.info("skipped %d: %s (first at %s)", count, reason, stats["skipped_examples"][reason])
    log.info("split (seed %d): %d train, %d eval", dataset["seed"], stats["train"], stats["eval"])
    if stats["train"] < stats["requested_train"]:
        log.warning("only %d train conversations available (%d requested)",
                    stats["train"], stats["requested_train"])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
