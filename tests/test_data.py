"""Reading and splitting conversations (scripts/prepare_data.py): the UltraChat and ShareGPT row
schemas from .jsonl/.json/.parquet files and directories of them, what dataset.source names (a
local-looking path never goes to the hub), a deterministic split, bad rows skipped and counted,
clear errors, and what data/stats.json records."""

import hashlib
import json
import shutil

import pandas as pd
import pytest
import yaml

from conftest import copy_workflow, run_snakemake
from prepare_data import DataError, dataset_source, load_rows, prepare
from prepare_data import main as prepare_data_main
from util import fake_snakemake


def ultrachat_200k_row(index, turns=1):
    messages = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn} of conversation {index}?"})
        messages.append({"role": "assistant", "content": f"Answer {turn} to conversation {index}."})
    return {"prompt": messages[0]["content"], "prompt_id": f"id-{index}", "messages": messages}


def original_ultrachat_row(index, turns=1):
    """The original UltraChat schema: {"id", "data": [user, assistant, user, ...]}."""
    row = ultrachat_200k_row(index, turns)
    return {"id": f"id-{index}", "data": [m["content"] for m in row["messages"]]}


def sharegpt_row(index, turns=1):
    """ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}."""
    speakers = {"user": "human", "assistant": "gpt", "system": "system"}
    row = ultrachat_200k_row(index, turns)
    return {"id": f"id-{index}",
            "conversations": [{"from": speakers[m["role"]], "value": m["content"]} for m in row["messages"]]}


ROW_SCHEMAS = {"ultrachat_200k": ultrachat_200k_row, "original": original_ultrachat_row,
               "sharegpt": sharegpt_row}


def write_rows(path, rows):
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


def read(path, num_train=100, num_eval=2, seed=0):
    return prepare(load_rows(str(path)), num_train, num_eval, seed)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("schema", ROW_SCHEMAS)
def test_both_schemas_from_every_file_type(tmp_path, suffix, schema):
    rows = [ROW_SCHEMAS[schema](index, turns=1 + index % 3) for index in range(8)]
    train, eval_, stats = read(write_rows(tmp_path / f"chats{suffix}", rows))

    assert stats["rows"] == stats["usable"] == 8 and stats["skipped"] == {}
    assert len(train) == 6 and len(eval_) == 2
    expected = {f"id-{i}": ultrachat_200k_row(i, turns=1 + i % 3)["messages"] for i in range(8)}
    got = {conversation["id"]: conversation["messages"] for conversation in train + eval_}
    assert got == expected


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_schemas_can_be_mixed_in_one_file(tmp_path, suffix):
    rows = [ultrachat_200k_row(0), original_ultrachat_row(1, turns=2), sharegpt_row(2, turns=3)]
    train, eval_, stats = read(write_rows(tmp_path / f"mixed{suffix}", rows), num_eval=1)
    assert stats["usable"] == 3
    assert sorted(len(c["messages"]) for c in train + eval_) == [2, 4, 6]
    # parquet fills the other schemas' id columns with NaN; each row keeps its own id
    assert sorted(c["id"] for c in train + eval_) == ["id-0", "id-1", "id-2"]


def test_system_message_at_the_start_is_kept(tmp_path):
    row = ultrachat_200k_row(0)
    row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    shared = sharegpt_row(2)
    shared["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    path = write_rows(tmp_path / "s.jsonl", [row, ultrachat_200k_row(1), shared])
    train, eval_, stats = read(path, num_eval=1)
    assert stats["skipped"] == {}
    kept = {c["id"]: c["messages"] for c in train + eval_}
    assert kept["id-0"] == row["messages"]
    assert kept["id-2"] == [row["messages"][0], *ultrachat_200k_row(2)["messages"]]


def test_split_is_deterministic_for_a_seed(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [ultrachat_200k_row(i) for i in range(60)])
    first = read(path, num_train=30, num_eval=10, seed=3)
    assert read(path, num_train=30, num_eval=10, seed=3) == first
    other = read(path, num_train=30, num_eval=10, seed=4)
    assert [c["id"] for c in other[1]] != [c["id"] for c in first[1]]

    train, eval_, _ = first
    assert len(train) == 30 and len(eval_) == 10
    assert not {c["id"] for c in train} & {c["id"] for c in eval_}


def test_eval_set_does_not_change_with_num_train(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [ultrachat_200k_row(i) for i in range(60)])
    small_train, small_eval, _ = read(path, num_train=5, num_eval=10)
    large_train, large_eval, stats = read(path, num_train=50, num_eval=10)
    assert small_eval == large_eval
    assert large_train[:5] == small_train  # more data extends the training set
    assert stats["train"] == 50 and stats["requested_train"] == 50


def test_fewer_rows_than_requested_uses_what_there_is(tmp_path):
    path = write_rows(tmp_path / "chats.jsonl", [ultrachat_200k_row(i) for i in range(12)])
    train, eval_, stats = read(path, num_train=100, num_eval=4)
    assert (len(train), len(eval_)) == (8, 4)
    assert (stats["train"], stats["requested_train"]) == (8, 100)


# One bad row per reason a row cannot be trained on.
BAD_LINES = {
    "invalid JSON": '{"messages": [',
    "not an object": "[1, 2, 3]",
    "neither schema": '{"prompt": "hi"}',
    "messages without roles": '{"messages": [{"content": "hi"}]}',
    "unknown role": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "bot", "content": "hello"}]}),
    "empty content": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "  "}]}),
    "system in the middle": json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "be nice"},
        {"role": "assistant", "content": "hello"}]}),
    "no assistant turn": json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    "not alternating": json.dumps({"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}]}),
    "starts with the assistant": json.dumps({"messages": [
        {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"}]}),
    "ShareGPT speaker that is no role": json.dumps({"conversations": [
        {"from": "human", "value": "weather?"}, {"from": "function_call", "value": "{}"},
        {"from": "gpt", "value": "sunny"}]}),
    "ShareGPT turn without value": json.dumps({"conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt"}]}),
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", BAD_LINES)
def test_a_bad_row_is_skipped_with_its_reason_and_line(tmp_path, case):
    good = [json.dumps(ultrachat_200k_row(i)) for i in range(3)]
    path = write_lines(tmp_path / "dirty.jsonl", [good[0], BAD_LINES[case], *good[1:]])
    train, eval_, stats = read(path, num_eval=1)
    assert len(train) + len(eval_) == stats["usable"] == 3 and stats["rows"] == 4
    (reason, count), = stats["skipped"].items()
    assert count == 1 and stats["skipped_examples"] == {reason: f"{path}:2"}


def test_bad_rows_are_counted_by_reason(tmp_path):
    good = [json.dumps(ultrachat_200k_row(i)) for i in range(6)]
    bad = list(BAD_LINES.values())
    lines = [*good[:3], *bad, "", *bad, *good[3:]]  # a blank line is no row
    train, eval_, stats = read(write_lines(tmp_path / "dirty.jsonl", lines))
    assert len(train) + len(eval_) == stats["usable"] == 6
    assert stats["rows"] == 6 + 2 * len(bad)
    assert sum(stats["skipped"].values()) == 2 * len(bad)
    assert all(count % 2 == 0 for count in stats["skipped"].values())
    assert any("JSON" in reason for reason in stats["skipped"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_missing_file_is_a_data_error_naming_it(tmp_path, suffix):
    missing = tmp_path / f"nope{suffix}"
    with pytest.raises(DataError, match="nope"):
        read(missing)


def test_empty_file_is_a_data_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no usable conversations out of 0 rows"):
        read(empty)


def test_only_bad_rows_is_a_data_error_that_says_why(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(BAD_LINES["no assistant turn"] + "\n" + BAD_LINES["invalid JSON"] + "\n")
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert "out of 2 rows" in message and "JSON" in message and "assistant" in message


def test_json_that_is_not_a_list_is_a_data_error(tmp_path):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"hello": "world"}))
    with pytest.raises(DataError, match="JSON list"):
        read(path)


def test_eval_taking_every_conversation_is_a_data_error(tmp_path):
    path = write_rows(tmp_path / "few.jsonl", [ultrachat_200k_row(i) for i in range(3)])
    with pytest.raises(DataError, match="num_eval"):
        read(path, num_eval=3)


def test_sharegpt_reasons_to_skip_name_the_speaker(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [json.dumps(ultrachat_200k_row(0)), json.dumps(ultrachat_200k_row(1)),
                                              BAD_LINES["ShareGPT speaker that is no role"],
                                              BAD_LINES["ShareGPT turn without value"]])
    _, _, stats = read(path, num_eval=1)
    assert stats["skipped"] == {"unknown role 'function_call'": 1, "conversations without from/value": 1}


def write_shards(directory):
    """Three shards of different types (named out of order) and files that are no shards."""
    directory.mkdir()
    write_rows(directory / "part-b.parquet", [ultrachat_200k_row(i) for i in range(3, 6)])
    write_rows(directory / "part-a.jsonl", [ultrachat_200k_row(i) for i in range(3)])
    write_rows(directory / "part-c.json", [sharegpt_row(i) for i in range(6, 8)])
    (directory / "README.md").write_text("# my shards\n")
    write_rows(directory / ".part-0.jsonl", [ultrachat_200k_row(99)])  # an editor's hidden copy
    return directory


def test_a_directory_reads_every_shard_in_name_order(tmp_path):
    directory = write_shards(tmp_path / "shards")
    source = dataset_source(str(directory))
    assert source.kind == "directory"
    assert source.files == tuple(str(directory / name) for name in ("part-a.jsonl", "part-b.parquet", "part-c.json"))
    rows = load_rows(str(directory))
    wheres = [where for where, _ in rows]
    assert wheres[0] == f"{directory / 'part-a.jsonl'}:1" and wheres[3] == f"{directory / 'part-b.parquet'} row 0"
    assert wheres[-1] == f"{directory / 'part-c.json'}[1]"
    train, eval_, stats = prepare(load_rows(str(directory)), 100, 2, 0)
    assert stats["rows"] == stats["usable"] == 8 and len(train) + len(eval_) == 8
    assert sorted(c["id"] for c in train + eval_) == [f"id-{i}" for i in range(8)]


def test_a_directory_without_shards_names_what_it_has(tmp_path):
    directory = tmp_path / "exports"
    directory.mkdir()
    (directory / "chats.csv").write_text("prompt,answer\n")
    with pytest.raises(DataError, match=r"dataset.source: the directory .*exports has no \.jsonl, \.json, "
                                        r"\.parquet files \(it has: chats.csv\)"):
        dataset_source(str(directory))


def test_an_existing_csv_is_a_clear_error_not_a_hub_lookup(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nhi,hello\n")
    with pytest.raises(DataError) as error:
        read(path)
    message = str(error.value)
    assert message.startswith(f"dataset.source: {path} is a .csv file; accepted: .jsonl, .json, .parquet")
    assert "\n" not in message


@pytest.mark.parametrize("source", ["./chats", "../elsewhere/chats", "/data/chats", "~/loranotes-none/chats",
                                    "data/exports/chats", "chats.jsonl", "org/chats.parquet", "chats.csv"])
def test_a_path_that_looks_local_never_goes_to_the_hub(tmp_path, monkeypatch, source):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"dataset.source: {source} does not exist"):
        read(source)


def test_an_existing_directory_with_a_hub_like_name_is_read_from_disk(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("went to the hub"))
    monkeypatch.chdir(tmp_path)
    write_shards(tmp_path / "shards")
    assert dataset_source("shards").kind == "directory"
    assert read("shards")[2]["usable"] == 8


def test_a_hub_id_is_loaded_with_its_split(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda source, split: calls.append((source, split))
                        or [ultrachat_200k_row(i) for i in range(4)])
    assert dataset_source("HuggingFaceH4/ultrachat_200k", "train_sft").kind == "hub"
    assert dataset_source("ultrachat", "train_sft").kind == "hub"
    rows = load_rows("HuggingFaceH4/ultrachat_200k", "test_sft")
    train, eval_, _ = prepare(rows, 10, 1, 0)
    assert calls == [("HuggingFaceH4/ultrachat_200k", "test_sft")] and len(train) + len(eval_) == 4
    assert rows.stats() == {"kind": "hub", "id": "HuggingFaceH4/ultrachat_200k", "split": "test_sft"}


def run_prepare_data(tmp_path, source, num_train=5, num_eval=2):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    prepare_data_main(fake_snakemake(
        output={name: str(out / f"{name}.{ext}") for name, ext in
                [("train", "jsonl"), ("eval", "jsonl"), ("stats", "json")]},
        params={"dataset": {"source": source, "split": "train_sft", "num_train": num_train,
                            "num_eval": num_eval, "seed": 0}},
        log={"log": str(tmp_path / "prepare_data.log")},
    ))
    return json.loads((out / "stats.json").read_text())


def test_stats_json_says_what_was_read(tmp_path):
    directory = write_shards(tmp_path / "shards")
    lines = [json.dumps(ultrachat_200k_row(i)) for i in range(3)]
    write_lines(directory / "part-a.jsonl", [lines[0], BAD_LINES["invalid JSON"], *lines[1:]])
    stats = run_prepare_data(tmp_path, str(directory), num_train=100)
    files = [{"path": str(directory / name), "rows": rows,
              "sha256": hashlib.sha256((directory / name).read_bytes()).hexdigest()}
             for name, rows in [("part-a.jsonl", 4), ("part-b.parquet", 3), ("part-c.json", 2)]]
    assert stats == {
        "source": {"kind": "directory", "path": str(directory), "files": files},
        "rows": 9, "usable": 8, "skipped": {"invalid JSON": 1},
        "skipped_examples": {"invalid JSON": f"{directory / 'part-a.jsonl'}:2"},
        "train": 6, "eval": 2, "requested_train": 100, "requested_eval": 2,
    }
    single = run_prepare_data(tmp_path, str(directory / "part-b.parquet"))
    assert single["source"]["kind"] == "file" and [f["rows"] for f in single["source"]["files"]] == [3]


@pytest.fixture(scope="module")
def shards_workflow(tmp_path_factory, shared_fixtures):
    """A copy of the workflow whose dataset.source is a directory of two real UltraChat shards."""
    workdir = copy_workflow(tmp_path_factory.mktemp("shards_workflow"))
    lines = (shared_fixtures / "ultrachat_sample.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (workdir / "shards").mkdir()
    (workdir / "shards" / "00.jsonl").write_text("".join(lines[:40]), encoding="utf-8")
    (workdir / "shards" / "01.jsonl").write_text("".join(lines[40:70]), encoding="utf-8")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    config["dataset"].update(source="shards", num_train=50, num_eval=10)
    (workdir / "shards.yaml").write_text(yaml.safe_dump(config))
    run_snakemake(workdir, "--cores", "1", "results/data/stats.json", "--configfile", "shards.yaml")
    return workdir


def planned(workdir, configfile):
    result = run_snakemake(workdir, "-n", "results/data/stats.json", "--configfile", configfile)
    return "Nothing to be done" not in result.stdout + result.stderr


def test_the_data_step_reads_every_shard_and_reruns_when_one_changes(shards_workflow):
    stats = json.loads((shards_workflow / "results/data/stats.json").read_text())
    assert [(f["path"], f["rows"]) for f in stats["source"]["files"]] == [("shards/00.jsonl", 40), ("shards/01.jsonl", 30)]
    assert stats["rows"] == 70 and stats["train"] == 50
    assert not planned(shards_workflow, "shards.yaml")
    shutil.copy(shards_workflow / "shards" / "01.jsonl", shards_workflow / "shards" / "02.jsonl")
    assert planned(shards_workflow, "shards.yaml")  # a new shard
    (shards_workflow / "shards" / "02.jsonl").unlink()
    assert not planned(shards_workflow, "shards.yaml")
    with open(shards_workflow / "shards" / "00.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(ultrachat_200k_row(0)) + "\n")
    assert planned(shards_workflow, "shards.yaml")  # an edited shard
    (shards_workflow / "shards" / "01.jsonl").unlink()
    assert planned(shards_workflow, "shards.yaml")  # a removed one


@pytest.mark.parametrize("source, expected", [
    ("notes.csv", "dataset.source: notes.csv is a .csv file; accepted: .jsonl, .json, .parquet"),
    ("./missing", "dataset.source: ./missing does not exist"),
])
def test_an_unreadable_source_stops_the_dry_run_with_one_line(shards_workflow, source, expected):
    (shards_workflow / "notes.csv").write_text("a,b\n1,2\n")
    config = yaml.safe_load((shards_workflow / "shards.yaml").read_text())
    config["dataset"]["source"] = source
    (shards_workflow / "bad.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(shards_workflow, "-n", "--configfile", "bad.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"bad.yaml: {expected}" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) < 8, output
