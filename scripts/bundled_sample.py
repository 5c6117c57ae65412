"""Generate the small chat dataset that loranotes ships as its default input.

The rows follow the HuggingFaceH4/ultrachat_200k schema:

    {"prompt": str, "prompt_id": sha256(prompt), "messages": [{"role", "content"}, ...]}

Nothing is downloaded or copied: every conversation is assembled from the hand-written
knowledge table in scripts/data/knowledge.yaml (topics across several domains, each with a few
facts, tips, an example and a comparison) and its question, answer and follow-up templates. A
seeded random.Random picks topics, templates and turn counts, so the same (knowledge, n, seed)
always gives byte-identical output.

Used by Snakemake's script directive (main) or directly:

    python scripts/bundled_sample.py OUT.jsonl [--n 400] [--seed 0]
"""

import argparse
import hashlib
import json
import logging
import random
from pathlib import Path

import yaml

from errors import configure_logging

log = logging.getLogger("loranotes.bundled_sample")

KNOWLEDGE_FILE = Path(__file__).resolve().parent / "data" / "knowledge.yaml"

# what each answer kind already covers, so follow-ups don't repeat it
COVERS = {"beginner": {"beginner", "example", "why"}, "points": {"points", "tips"}, "tips": {"points", "tips"}}
# number of user turns: mostly one or two, with a healthy share of longer chats
TURN_COUNTS, TURN_WEIGHTS = [1, 2, 3, 4], [0.35, 0.3, 0.2, 0.15]


def load_knowledge(path=KNOWLEDGE_FILE):
    """{"topics": [...], "templates": {...}} from the knowledge file (libyaml's parser: 0.03 s
    instead of 0.2 s for the pure-Python one)."""
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def unknown_topics(knowledge, names):
    """The names in `names` that are not topics of the knowledge table ("all" names them all)."""
    known = {topic["name"] for topic in knowledge["topics"]}
    return [] if names == "all" else [name for name in names if name not in known]


def select_topics(knowledge, names):
    """The knowledge table's topics named in `names` ("all": every one), in the table's order."""
    unknown = unknown_topics(knowledge, names)
    if unknown:
        raise ValueError(f"not topics of the knowledge table: {', '.join(unknown)}")
    return [topic for topic in knowledge["topics"] if names == "all" or topic["name"] in names]


def lower_first(question):
    # only for our own question templates, which never start with a name
    return question[0].lower() + question[1:]


def code_block(topic):
    return f"```{topic['code']['language']}\n{topic['code']['snippet']}\n```"


class ConversationWriter:
    """Writes conversations about the knowledge table's topics, drawing every choice from rng."""

    def __init__(self, knowledge, rng):
        self.topics = knowledge["topics"]
        self.templates = knowledge["templates"]
        self.rng = rng

    def pick(self, template_name):
        return self.rng.choice(self.templates[template_name])

    def answer(self, topic, kind, follow_up=False):
        """One assistant reply about topic, shaped by the kind of question asked."""
        rng, facts = self.rng, topic["facts"]
        if kind == "explain":
            body = " ".join(facts)
            if "code" in topic and rng.random() < 0.4:
                body += "\n\nHere is a small example:\n\n" + code_block(topic)
        elif kind == "why":
            why = self.pick("why_leads") + topic["why"]
            if follow_up:  # the definition was already given, add a point instead
                body = why + " " + rng.choice(topic["points"])
            else:
                body = " ".join(facts[:2]) + " " + why
        elif kind == "beginner":
            body = facts[0] + " " + self.pick("example_leads") + topic["example"] + " " + topic["why"]
        elif kind in ("points", "tips"):
            word = "tips" if kind == "tips" and topic["practical"] else "key points"
            items = rng.sample(topic["points"], 3)
            numbered = rng.random() < 0.5
            lines = [f"{i + 1}. {item}" if numbered else f"- {item}" for i, item in enumerate(items)]
            intro = self.pick("list_intros").format(word=word, name=topic["name"])
            body = facts[0] + "\n\n" + intro + "\n\n" + "\n".join(lines)
        elif kind == "example":
            body = self.pick("example_leads") + topic["example"]
            if "code" in topic:
                body += "\n\nIn code, it looks like this:\n\n" + code_block(topic)
            else:
                lead = " A related tip: " if topic["practical"] else " Also worth knowing: "
                body += lead + rng.choice(topic["points"])
        elif kind == "contrast":
            body = self.pick("contrast_leads") + topic["contrast"]["difference"]
        elif kind == "summary":
            return self.pick("summary_leads") + facts[0]
        else:
            raise ValueError(f"unknown answer kind {kind!r}")
        closers = self.templates["answer_closers"]
        if kind in ("example", "beginner"):  # don't offer an example right after giving one
            closers = [c for c in closers if "example" not in c]
        return self.pick("answer_openers") + body + rng.choice(closers)

    def first_question(self, topic):
        """Pick a first-turn question kind and wording for topic."""
        kinds = ["explain", "why", "beginner", "points"] + (["tips"] if topic["practical"] else [])
        kind = self.rng.choice(kinds)
        return kind, self.rng.choice(self.templates["questions"][kind]).format(name=topic["name"])

    def other_topic(self, topic):
        """Another topic for a 'one more question' turn, usually from the same domain."""
        same_domain = [t for t in self.topics if t["domain"] == topic["domain"] and t is not topic]
        if same_domain and self.rng.random() < 0.6:
            return self.rng.choice(same_domain)
        return self.rng.choice([t for t in self.topics if t is not topic])

    def conversation(self, topic, n_turns, seen_prompts):
        # first turn; retry the wording a few times so first prompts rarely repeat
        for _ in range(20):
            kind, question = self.first_question(topic)
            prompt = self.pick("prompt_openers") + question + self.pick("prompt_closers")
            if prompt not in seen_prompts:
                break
        seen_prompts.add(prompt)
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": self.answer(topic, kind)}]
        asked = {(topic["name"], k) for k in COVERS.get(kind, {kind})}  # never ask the same thing twice

        for _ in range(n_turns - 1):
            list_kind = "tips" if topic["practical"] else "points"
            options = [k for k in ("example", "contrast", "summary", "why", list_kind)
                       if (topic["name"], k) not in asked]
            options.append("another")
            follow = self.rng.choice(options)
            if follow == "another":
                topic = self.other_topic(topic)
                kind, question = self.first_question(topic)
                user = self.rng.choice(self.templates["follow_ups"]["another"]).format(
                    question=lower_first(question))
                reply = self.answer(topic, kind)
            else:
                kind = follow
                user = self.rng.choice(self.templates["follow_ups"][follow]).format(
                    other=topic["contrast"]["with"])
                reply = self.answer(topic, kind, follow_up=True)
            asked |= {(topic["name"], k) for k in COVERS.get(kind, {kind})}
            messages.append({"role": "user", "content": user})
            messages.append({"role": "assistant", "content": reply})
        return messages


def make_conversations(n=400, seed=0, knowledge=None, topics="all"):
    """n conversations in the ultrachat_200k schema about the knowledge table's `topics` (names,
    or "all"), fully determined by (knowledge, topics, n, seed); knowledge defaults to
    scripts/data/knowledge.yaml."""
    knowledge = knowledge or load_knowledge()
    knowledge = {**knowledge, "topics": select_topics(knowledge, topics)}
    writer = ConversationWriter(knowledge, random.Random(seed))
    rows, seen_prompts, deck = [], set(), []
    for _ in range(n):
        # deal topics from a shuffled deck so every topic shows up evenly
        if not deck:
            deck = list(writer.topics)
            writer.rng.shuffle(deck)
        topic = deck.pop()
        n_turns = writer.rng.choices(TURN_COUNTS, weights=TURN_WEIGHTS)[0]
        messages = writer.conversation(topic, n_turns, seen_prompts)
        prompt = messages[0]["content"]
        rows.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "messages": messages,
        })
    return rows


# -----------------------------------------------------------------------------
# entry points


def write_jsonl(rows, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(snakemake):
    configure_logging(snakemake)
    knowledge = load_knowledge(snakemake.input.knowledge)
    n, seed, topics = int(snakemake.params.n), int(snakemake.params.seed), snakemake.params.topics
    rows = make_conversations(n=n, seed=seed, knowledge=knowledge, topics=topics)
    write_jsonl(rows, snakemake.output[0])
    turns = sum(len(row["messages"]) // 2 for row in rows)
    log.info("%d conversations (%d user turns) about %d of the %d topics in %s, seed %d -> %s",
             len(rows), turns, len(select_topics(knowledge, topics)), len(knowledge["topics"]),
             snakemake.input.knowledge, seed, snakemake.output[0])


def cli():
    parser = argparse.ArgumentParser(description="Write the bundled UltraChat-format sample as JSON lines.")
    parser.add_argument("out", help="output .jsonl path")
    parser.add_argument("--n", type=int, default=400, help="number of conversations")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--knowledge", default=KNOWLEDGE_FILE, help="knowledge table (YAML)")
    args = parser.parse_args()
    write_jsonl(make_conversations(n=args.n, seed=args.seed, knowledge=load_knowledge(args.knowledge)), args.out)


if __name__ == "__main__":
    if "snakemake" in globals():
        main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
    else:
        cli()
