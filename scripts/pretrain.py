"""Pretrain a tiny built model: a few seconds of plain causal language modelling, on one CPU
thread, on the bundled knowledge table (scripts/data/knowledge.yaml) written out as text.

The text is short articles and question-and-answer passages about each topic, as web pages
have them: never in a chat format, and never with an end-of-turn token (documents are
separated by the tokenizer's BOS token, or its padding token when it has none). Answering in
turns and stopping at the end of an answer are left for fine-tuning to teach, and the
before/after samples show it.

The special tokens of the chat format are never trained here (their logits are left out of the
loss, so they are not pushed below every other token either); once pretraining ends their output
rows get random directions at the average length of the trained ones, so that fine-tuning starts
the end-of-turn token from an ordinary token: with the initial tiny row, LoRA did not lift it
within 100 steps (P = 8e-5 at the end of held-out answers; 0.39 with this, measured on the tiny
Qwen3). Their input rows stay small, which is why the embedded default's models do not tie
input and output embeddings.

Deterministic: the same settings give the same weights (seeded initialisation, seeded windows,
one thread).
"""

import logging
import math
import random
import time

import torch

log = logging.getLogger("loranotes.build_model")

PRETRAIN_DEFAULTS = {
    "steps": 300,
    "batch_size": 4,       # windows per step
    "seq_length": 128,     # tokens per window
    "lr": 1.0e-2,
    "warmup_steps": 10,
    "copies": 4,           # renderings of each topic, each with its own wording and order
    "seed": 0,
}
TEXT = "the bundled knowledge table as plain text"
# Questions worded as people ask them, per topic and copy: they teach the model to find the topic
# in a question whatever its wording, which a chat prompt needs (in one run of the tiny Qwen3,
# with articles and one fixed wording only, 2 of 4 held-out prompts were answered on topic after
# fine-tuning; 3 of 4 with these).
QUESTIONS_PER_COPY = 2


def pretrain_settings(model, weights):
    """A config model's `init.pretrain` settings with defaults, or None: random weights (no
    `pretrain:`, or capacity planning's `weights: random`, which plans with random weights)."""
    pretrain = model.get("init", {}).get("pretrain")
    if pretrain is None or weights == "random":
        return None
    return {**PRETRAIN_DEFAULTS, **pretrain}


def capitalized(text):
    return text[0].upper() + text[1:]


def topic_documents(topic, templates, rng):
    """Plain-text pages about one topic: an article, a page of questions and answers, and a few
    questions as people word them (the bundled sample's question templates), each followed by
    the topic's definition. Sections, questions and wordings are in a random order."""
    name, title = topic["name"], capitalized(topic["name"])
    points = " ".join(rng.sample(topic["points"], len(topic["points"])))
    sections = [
        f"{title} matters because {topic['why'][0].lower()}{topic['why'][1:]}",
        (f"Tips for {name}: " if topic["practical"] else f"Key points about {name}: ") + points,
        f"An example of {name}: {topic['example']}",
        f"{title} compared with {topic['contrast']['with']}: {topic['contrast']['difference']}",
    ]
    rng.shuffle(sections)
    article = "\n\n".join([f"{title} ({topic['domain']})", " ".join(topic["facts"]), *sections])
    questions = [
        (f"Why does {name} matter?", topic["why"]),
        (f"What should I keep in mind about {name}?", points),
        (f"What is an example of {name}?", topic["example"]),
        (f"How is {name} different from {topic['contrast']['with']}?", topic["contrast"]["difference"]),
    ]
    rng.shuffle(questions)
    qa = "\n\n".join(f"{q} {a}" for q, a in [(f"What is {name}?", " ".join(topic["facts"])), *questions])
    kinds = [kind for kind in templates["questions"] if kind != "tips" or topic["practical"]]
    asked = []
    for _ in range(QUESTIONS_PER_COPY):
        wording = rng.choice(templates["questions"][rng.choice(kinds)]).format(name=name)
        question = rng.choice(templates["prompt_openers"]) + wording + rng.choice(templates["prompt_closers"])
        asked.append(f"{question} {' '.join(topic['facts'][:2])}")
    return [article, f"Questions about {name}\n\n{qa}", *asked]


def knowledge_documents(knowledge, copies, seed):
    """`copies` renderings of every topic's pages, shuffled; the same for the same seed.
    `knowledge` is {"topics": [...], "templates": {...}} (bundled_sample.load_knowledge)."""
    rng = random.Random(seed)
    documents = [
        document
        for _ in range(copies)
        for topic in knowledge["topics"]
        for document in topic_documents(topic, knowledge["templates"], rng)
    ]
    rng.shuffle(documents)
    return documents


def token_stream(tokenizer, documents):
    """The documents' tokens back to back, each after a separator: BOS, or padding when the
    tokenizer has no BOS (Qwen's), never the end-of-turn token."""
    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id
    ids = []
    for document in documents:
        ids += [separator, *tokenizer(document, add_special_tokens=False)["input_ids"]]
    return torch.tensor(ids), separator


def untrained_tokens(tokenizer, separator):
    """Special tokens the documents never contain: the chat format's (<|im_start|> too, which
    is no named special token and so not in all_special_ids), and <unk>."""
    return sorted(i for i, token in tokenizer.added_tokens_decoder.items() if token.special and i != separator)


def pretrain(model, tokenizer, documents, settings):
    """Train `model` in place on `documents`, on one CPU thread whatever the job was given (the
    weights then do not depend on the thread count; a tiny model's matmuls gain little from more);
    returns what the built model's record says."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_on_documents(model, tokenizer, documents, settings)
    finally:
        torch.set_num_threads(threads)


def train_on_documents(model, tokenizer, documents, settings):
    torch.manual_seed(settings["seed"])
    stream, separator = token_stream(tokenizer, documents)
    untrained = untrained_tokens(tokenizer, separator)
    length, steps = settings["seq_length"], settings["steps"]
    if len(stream) <= length:
        raise ValueError(f"pretraining text of {len(stream)} tokens is shorter than seq_length {length}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, settings))
    windows = torch.Generator().manual_seed(settings["seed"])
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(stream) - length, (settings["batch_size"],), generator=windows)
        batch = torch.stack([stream[start : start + length + 1] for start in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        logits[..., untrained] = float("-inf")  # never a target, and not pushed down either
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 1 or step % 50 == 0 or step == steps:
            log.info("pretrain step %d/%d  loss %.3f  %.1fs", step, steps, loss.item(),
                     time.perf_counter() - started)
    model.eval()
    spread_untrained_embeddings(model, untrained, len(tokenizer), settings["seed"])
    tail = losses[-max(1, steps // 10):]
    return {
        "steps": steps,
        "text": TEXT,
        "documents": len(documents),
        "text_tokens": len(stream),
        "tokens": steps * settings["batch_size"] * length,  # trained on: windows x steps
        "final_loss": sum(tail) / len(tail),  # mean of the last 10% of steps
        "seconds": time.perf_counter() - started,
        "settings": settings,
    }


def warmup_cosine(step, settings):
    """Linear warm-up, then a cosine from the peak learning rate down to a tenth of it."""
    if step < settings["warmup_steps"]:
        return (step + 1) / settings["warmup_steps"]
    progress = (step - settings["warmup_steps"]) / max(1, settings["steps"] - settings["warmup_steps"])
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def spread_untrained_embeddings(model, token_ids, vocab_in_use, seed):
    """Give the output rows of untrained tokens random directions at the average length of the
    trained rows (the first `vocab_in_use`, the tokenizer's). Their input rows keep their small
    initial values, so a chat marker barely disturbs a model that never saw one, unless input
    and output embeddings are tied (then they are one row)."""
    weight = model.get_output_embeddings().weight
    trained = torch.arange(weight.size(0)) < vocab_in_use
    trained[token_ids] = False
    length = weight[trained].norm(dim=1).mean()
    directions = torch.randn(len(token_ids), weight.size(1), generator=torch.Generator().manual_seed(seed))
    weight[token_ids] = (directions / directions.norm(dim=1, keepdim=True) * length).to(weight.dtype)
