"""Reading and splitting conversations (scripts/prepare_data.py): both UltraChat row schemas from
.jsonl/.json/.parquet, a deterministic split, bad rows skipped and counted, clear errors."""

import json

import pandas as pd
import pytest

from prepare_data import DataError, load_rows, prepare


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


ROW_SCHEMAS = {"ultrachat_200k": ultrachat_200k_row, "original": original_ultrachat_row}


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
    rows = [ultrachat_200k_row(0), original_ultrachat_row(1, turns=2)]
    train, eval_, stats = read(write_rows(tmp_path / f"mixed{suffix}", rows), num_eval=1)
    assert stats["usable"] == 2
    assert sorted(len(c["messages"]) for c in train + eval_) == [2, 4]
    # parquet fills the other schema's id column with NaN; each row keeps its own id
    assert sorted(c["id"] for c in train + eval_) == ["id-0", "id-1"]


def test_system_message_at_the_start_is_kept(tmp_path):
    row = ultrachat_200k_row(0)
    row["messages"].insert(0, {"role": "system", "content": "Be brief."})
    train, eval_, stats = read(write_rows(tmp_path / "s.jsonl", [row, ultrachat_200k_row(1)]), num_eval=1)
    assert stats["skipped"] == {}
    kept = next(c for c in train + eval_ if c["id"] == "id-0")
    assert kept["messages"] == row["messages"]


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
