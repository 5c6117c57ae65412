"""Tests for scripts/bundled_sample.py, the generator of the default chat dataset, and its
knowledge table scripts/data/knowledge.yaml."""

import hashlib
import json
import random
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bundled_sample.py"
sys.path.insert(0, str(REPO / "scripts"))

from bundled_sample import KNOWLEDGE_FILE, load_knowledge, main, make_conversations  # noqa: E402
from util import fake_snakemake  # noqa: E402

TOPICS = load_knowledge()["topics"]


@pytest.fixture(scope="module")
def rows():
    return make_conversations(n=400, seed=0)


def assistant_texts(rows):
    return [m["content"] for r in rows for m in r["messages"] if m["role"] == "assistant"]


def topics_asked_about(rows):
    """Names of table topics that some user message mentions."""
    user_text = "\n".join(m["content"] for r in rows for m in r["messages"] if m["role"] == "user")
    return {t["name"] for t in TOPICS if t["name"] in user_text}


# -----------------------------------------------------------------------------
# determinism


def test_same_seed_gives_identical_output():
    assert make_conversations(n=50, seed=7) == make_conversations(n=50, seed=7)


def test_different_seeds_give_different_output():
    a, b = make_conversations(n=50, seed=0), make_conversations(n=50, seed=1)
    assert a != b
    # not just a reshuffle of the same rows
    assert {r["prompt"] for r in a} != {r["prompt"] for r in b}


def test_does_not_use_or_disturb_global_random_state():
    random.seed(123)
    state = random.getstate()
    first = make_conversations(n=30, seed=3)
    assert random.getstate() == state, "generator consumed the global random state"
    random.seed(999)
    assert make_conversations(n=30, seed=3) == first


def test_default_arguments():
    assert make_conversations() == make_conversations(n=400, seed=0)


@pytest.mark.parametrize("n", [0, 1, 37, 400])
def test_count(n):
    assert len(make_conversations(n=n, seed=0)) == n


def test_prefix_stable_across_n():
    # the same seed and a smaller n should give the start of the same dataset
    assert make_conversations(n=20, seed=5) == make_conversations(n=60, seed=5)[:20]


# -----------------------------------------------------------------------------
# ultrachat_200k schema


def test_schema(rows):
    for row in rows:
        assert set(row) == {"prompt", "prompt_id", "messages"}
        messages = row["messages"]
        assert 2 <= len(messages) <= 8 and len(messages) % 2 == 0
        for i, message in enumerate(messages):
            assert set(message) == {"role", "content"}
            assert message["role"] == ("user" if i % 2 == 0 else "assistant")
            assert isinstance(message["content"], str)
        assert messages[-1]["role"] == "assistant"
        assert row["prompt"] == messages[0]["content"]
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()


def test_no_empty_or_padded_content(rows):
    for row in rows:
        for message in row["messages"]:
            text = message["content"]
            assert text.strip(), row
            assert text == text.strip(), f"leading/trailing whitespace: {text!r}"
            prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code keeps its indentation
            for line in prose.splitlines():
                assert "  " not in line, f"double space: {text!r}"


def test_rows_are_json_serializable(rows):
    for row in rows:
        assert json.loads(json.dumps(row, ensure_ascii=False)) == row


# -----------------------------------------------------------------------------
# variety and plausibility


def test_knowledge_table_is_broad():
    assert 25 <= len(TOPICS) <= 40
    assert len({t["name"] for t in TOPICS}) == len(TOPICS)
    domains = Counter(t["domain"] for t in TOPICS)
    assert len(domains) >= 8
    names = {t["name"] for t in TOPICS}
    for required in ["contrastive learning", "LoRA", "quantization", "overfitting", "gradient descent", "attention", "tokenization"]:
        assert required in names


def test_topics_are_well_covered(rows):
    first_prompt_topics = topics_asked_about([{"messages": r["messages"][:1]} for r in rows])
    assert len(first_prompt_topics) >= 25
    assert topics_asked_about(rows) == {t["name"] for t in TOPICS}


def test_first_prompts_mostly_distinct(rows):
    assert len({r["prompt"] for r in rows}) >= 0.9 * len(rows)
    assert len({r["prompt_id"] for r in rows}) >= 0.9 * len(rows)


def test_multi_turn_mix(rows):
    turns = Counter(len(r["messages"]) // 2 for r in rows)
    assert set(turns) == {1, 2, 3, 4}
    for n_turns in (1, 2, 3, 4):
        assert turns[n_turns] >= 0.05 * len(rows), turns


def test_follow_ups_are_varied(rows):
    follow_ups = Counter(m["content"] for r in rows for m in r["messages"][2::2])
    assert len(follow_ups) >= 20
    # both canned follow-ups and switches to a new topic occur
    assert any("one sentence" in q.lower() for q in follow_ups)
    assert any("different from" in q or "compare to" in q for q in follow_ups)
    assert any(q.startswith("Thanks! One more question:") for q in follow_ups)


def test_assistant_replies_have_plausible_length(rows):
    word_counts = [len(text.split()) for text in assistant_texts(rows)]
    assert 40 <= statistics.median(word_counts) <= 150
    assert max(word_counts) <= 200
    first_answers = [len(r["messages"][1]["content"].split()) for r in rows]
    assert min(first_answers) >= 30
    assert len(set(assistant_texts(rows))) >= 0.7 * len(word_counts)


def test_lists_and_code_fences_appear_and_are_well_formed(rows):
    texts = assistant_texts(rows)
    fenced = [t for t in texts if "```" in t]
    assert fenced, "no code fences at all"
    for text in fenced:
        assert text.count("```") % 2 == 0, text
        assert re.search(r"```(python|bash)\n", text), text
    assert any(re.search(r"^1\. ", t, re.M) for t in texts), "no numbered lists"
    assert any(re.search(r"^- ", t, re.M) for t in texts), "no bulleted lists"


def test_no_unfilled_template_placeholders(rows):
    for row in rows:
        for message in row["messages"]:
            prose = re.sub(r"```.*?```", "", message["content"], flags=re.S)  # code may hold braces
            assert not re.search(r"\{\w*\}", prose), message["content"]


def test_table_text_is_used_verbatim(rows):
    all_text = "\n".join(assistant_texts(rows))
    for topic in TOPICS:
        assert topic["facts"][0] in all_text, topic["name"]
    # names that start a table sentence must not be lowercased by a template ("loRA", "johannes")
    for name in ["LoRA", "CLIP", "Johannes", "Newton's", "King", "Maria", "Buddhism", "Sunlight"]:
        assert name in all_text, name
        assert not re.search(rf"\b{re.escape(name[0].lower() + name[1:])}", all_text), name


# -----------------------------------------------------------------------------
# entry points


def read_jsonl(path):
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_cli_writes_jsonl(tmp_path):
    out = tmp_path / "nested" / "sample.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), str(out), "--n", "25", "--seed", "4"], check=True, cwd=tmp_path)
    assert read_jsonl(out) == make_conversations(n=25, seed=4)


def test_cli_defaults(tmp_path):
    out = tmp_path / "sample.jsonl"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, cwd=tmp_path)
    assert read_jsonl(out) == make_conversations()


def test_main_with_snakemake_object(tmp_path):
    out = tmp_path / "data" / "sample.jsonl"
    main(fake_snakemake(input={"knowledge": str(KNOWLEDGE_FILE)}, output={"sample": str(out)},
                        params={"n": 12, "seed": 2, "topics": "all"},
                        log={"log": str(tmp_path / "bundled_sample.log")}))
    assert read_jsonl(out) == make_conversations(n=12, seed=2)


def test_a_topic_subset_keeps_to_those_topics():
    names = ["LoRA", "sourdough baking", "the water cycle"]
    rows = make_conversations(n=60, seed=0, topics=names)
    asked = topics_asked_about(rows)
    assert asked == set(names)  # every one, and no other (follow-ups stay within the subset)


def test_an_unknown_topic_is_refused_by_name():
    with pytest.raises(ValueError, match="not topics of the knowledge table: cooking pasta"):
        make_conversations(n=5, topics=["LoRA", "cooking pasta"])


def test_an_edited_knowledge_table_changes_the_sample(tmp_path):
    knowledge = load_knowledge()
    knowledge["topics"][0]["facts"][0] = "A rewritten first fact about contrastive learning."
    rows = make_conversations(n=80, seed=0, knowledge=knowledge)
    assert "A rewritten first fact about contrastive learning." in "\n".join(assistant_texts(rows))


def test_runs_under_snakemake_script_directive(tmp_path):
    (tmp_path / "Snakefile").write_text(
        "rule sample:\n"
        f"    input: knowledge={str(KNOWLEDGE_FILE)!r}\n"
        "    output: 'sample.jsonl'\n"
        "    log: 'sample.log'\n"
        "    params: n=9, seed=1, topics='all'\n"
        f"    script: {str(SCRIPT)!r}\n"
    )
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--quiet"], check=True,
                   cwd=tmp_path, capture_output=True)
    assert read_jsonl(tmp_path / "sample.jsonl") == make_conversations(n=9, seed=1)
    assert "9 conversations" in (tmp_path / "sample.log").read_text()
