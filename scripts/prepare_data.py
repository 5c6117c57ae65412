"""Load conversations, check them, and split them into train and held-out eval sets.

Sources (`dataset_source` decides which one dataset.source names): the bundled sample (a JSONL
file the `bundled_sample` rule writes), a local .jsonl/.json/.parquet file, a directory of such
shards (all of them, sorted by name), or a Hugging Face Hub dataset id + split. Three row schemas
are accepted, also mixed:
- ultrachat_200k: {"prompt", "prompt_id", "messages": [{"role", "content"}, ...]}
- original UltraChat: {"id", "data": [user, assistant, user, ...]}
- ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}

Rows that cannot be trained on are skipped and counted by reason (the counts go to the log, to
data/stats.json and into the report); nothing is dropped silently. The split is deterministic
given the seed, and the eval set is drawn first, so changing num_train keeps the same eval set.
"""

import hashlib
import json
import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from errors import LoranotesError, configure_logging, entry_point

log = logging.getLogger("loranotes.prepare_data")

ROLES = {"system", "user", "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
READ_SUFFIXES = (".jsonl", ".json", ".parquet")
# Files people keep datasets in that are not read: a source ending so is a file, never a hub id.
OTHER_DATA_SUFFIXES = (".csv", ".tsv", ".txt", ".arrow", ".xlsx", ".xls", ".gz", ".zip", ".tar", ".pkl")
BUNDLED_SAMPLE = "results/data/bundled_sample.jsonl"  # the bundled_sample rule's output
PREPARED_ROOT = "results/data/prepared"  # one folder per dataset settings (prepared_dir)


class DataError(LoranotesError, ValueError):
    """The dataset cannot be used at all (missing, unreadable, empty after checks)."""


@dataclass(frozen=True)
class DatasetSource:
    """What dataset.source names: kind is "bundled", "file", "directory" or "hub"; location is
    the path or the hub id; files are the local files read, in order; split is the hub split
    (and the key of a .json file's {split: [...]} wrapper)."""

    kind: str
    location: str
    files: tuple = ()
    split: str | None = None


def prepared_dir(dataset):
    """Where the data step writes its split for these dataset settings: a folder named by
    their hash, so a failed job for other settings never touches it."""
    settings = json.dumps(dataset, sort_keys=True, ensure_ascii=False)
    return f"{PREPARED_ROOT}/{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def looks_local(source):
    """A path, never a hub id (which is `name` or `org/name`): explicit (/, ./, ../, ~), existing,
    nested deeper than org/name, or ending in a data file's suffix."""
    return (
        source.startswith(("/", "./", "../", "~"))
        or Path(source).expanduser().exists()
        or source.count("/") > 1
        or Path(source).suffix.lower() in READ_SUFFIXES + OTHER_DATA_SUFFIXES
    )


def dataset_source(source, split="train_sft"):
    """The DatasetSource that dataset.source names; a DataError for a local path that cannot be
    read (missing, a type not read, a directory without shards)."""
    if source == "bundled":
        return DatasetSource("bundled", BUNDLED_SAMPLE, (BUNDLED_SAMPLE,), split)
    if not looks_local(source):
        return DatasetSource("hub", source, split=split)
    path = Path(source).expanduser()
    accepted = ", ".join(READ_SUFFIXES)
    if path.is_dir():
        check_readable(path, os.R_OK | os.X_OK)
        entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        shards = [p for p in entries if p.suffix.lower() in READ_SUFFIXES]
        if not shards:
            found = ", ".join(p.name for p in entries[:5]) or "nothing"
            raise DataError(f"dataset.source: the directory {source} has no {accepted} files "
                            f"(it has: {found}); put the shards there or point source at one file")
        for shard in shards:
            check_readable(shard)
        return DatasetSource("directory", source, tuple(str(p) for p in shards), split)
    if not path.exists():
        raise DataError(f"dataset.source: {source} does not exist (a hub dataset id looks like "
                        "org/name, without a leading / or ./ and without a file suffix)")
    if path.suffix.lower() not in READ_SUFFIXES:
        raise DataError(f"dataset.source: {source} is a {path.suffix or 'suffix-less'} file; "
                        f"accepted: {accepted} files or a directory of them (pandas converts "
                        "a .csv: pd.read_csv(path).to_json(out, orient='records', lines=True))")
    check_readable(path)
    return DatasetSource("file", source, (source,), split)


def check_readable(path, mode=os.R_OK):
    """A DataError naming dataset.source when this process may not read `path`."""
    if not os.access(path, mode):
        what = "list the directory" if Path(path).is_dir() else "read"
        raise DataError(f"dataset.source: {path} exists but this user may not {what} it "
                        "(permission denied); make it readable (chmod a+r, and a+x on its "
                        "directories) or point source at a copy")


class SourceRows:
    """The rows of a dataset source as (where, row) pairs, `where` naming the file and line for
    messages; while they are read, rows_read counts them per local file."""

    def __init__(self, source):
        self.source = source
        self.rows_read = Counter()

    def __iter__(self):
        if self.source.kind == "hub":
            yield from load_hub_rows(self.source.location, self.source.split)
            return
        for path in self.source.files:
            for where, row in read_file(Path(path), self.source.split):
                self.rows_read[path] += 1
                yield where, row

    def stats(self):
        """What was read, for data/stats.json: kind, path (files with sha256 and rows) or hub id
        and split."""
        if self.source.kind == "hub":
            return {"kind": "hub", "id": self.source.location, "split": self.source.split}
        files = [{"path": path, "sha256": file_sha256(path), "rows": self.rows_read[path]}
                 for path in self.source.files]
        return {"kind": self.source.kind, "path": self.source.location, "files": files}


def load_rows(source, split="train_sft"):
    """The rows dataset.source names, as SourceRows."""
    return SourceRows(dataset_source(source, split))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_file(path, split="train_sft"):
    """(where, row) pairs of one local .jsonl/.json/.parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    yield where, InvalidJSON(str(error))
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(rows, dict):  # {"data": [...]} / {"train": [...]} style wrappers
            rows = rows.get(split) or rows.get("data") or rows.get("rows")
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of conversations")
        for index, row in enumerate(rows):
            yield f"{path}[{index}]", row
    else:
        import pandas as pd

        for index, row in enumerate(pd.read_parquet(path).to_dict("records")):
            yield f"{path} row {index}", _plain(row)


def load_hub_rows(source, split):
    import datasets

    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:  # offline, unknown id, unknown split: one line, not a traceback
        raise DataError(
            f"dataset.source: could not load hub dataset '{source}' split '{split}' "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Check the id and split, your network and HF_TOKEN, or point source at a local "
            ".jsonl/.json/.parquet file or a directory of them."
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
    elif isinstance(row.get("conversations"), list):
        turns = row["conversations"]
        if not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
            raise ValueError("conversations without from/value")
        # ShareGPT: human/gpt/system; other speakers ("tool", "bing") stay unknown roles.
        messages = [{"role": SHAREGPT_ROLES.get(t["from"], t["from"]), "content": t["value"]}
                    for t in turns]
    elif isinstance(row.get("data"), list):
        # Original UltraChat: a plain list of turns, starting with the user.
        messages = [
            {"role": "user" if index % 2 == 0 else "assistant", "content": content}
            for index, content in enumerate(row["data"])
        ]
    else:
        raise ValueError("no known schema (no 'messages', 'conversations' or 'data' list)")
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
        # A parquet file that mixes schemas fills the other schemas' id columns with NaN.
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
    rows = load_rows(dataset["source"], dataset["split"])
    train_set, eval_set, stats = prepare(rows, dataset["num_train"], dataset["num_eval"], dataset["seed"])
    stats = {"source": rows.stats(), **stats}
    write_jsonl(train_set, snakemake.output.train)
    write_jsonl(eval_set, snakemake.output.eval)
    Path(snakemake.output.stats).write_text(json.dumps(stats, indent=2) + "\n")
    read_from = rows.source.location + (f" ({len(rows.source.files)} files)"
                                        if rows.source.kind == "directory" else "")
    log.info("read %d rows from %s: %d usable", stats["rows"], read_from, stats["usable"])
    for reason, count in stats["skipped"].items():
        log.info("skipped %d: %s (first at %s)", count, reason, stats["skipped_examples"][reason])
    log.info("split (seed %d): %d train, %d eval", dataset["seed"], stats["train"], stats["eval"])
    if stats["train"] < stats["requested_train"]:
        log.warning("only %d train conversations available (%d requested)",
                    stats["train"], stats["requested_train"])


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
