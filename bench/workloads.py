"""What bench/speed.py and bench/profile_step.py train on: random weights of the seed's real
architectures (speed does not depend on the weights) and the batches of each workload.

`fixed` is 4 x 1024 random tokens, every token a target, no padding. `ultrachat` uses real
UltraChat conversation lengths (characters / 4, capped at 1024 like the pipeline's max_length):
padded batches for the baseline, packed ones of the same conversations for the trainer, and
packed batches of up to a token budget (training.batch_tokens).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from batches import collate, pack, token_budget_batches  # noqa: E402
from build_model import random_init_model, train_tokenizer  # noqa: E402
from model_sources import KNOWN_ARCHITECTURES  # noqa: E402

VARIANTS = {
    "v1": ("Qwen/Qwen3-4B", "nf4"),
    "v2": ("Qwen/Qwen3-4B", "none"),
    "v3": ("meta-llama/Llama-2-7b-hf", "nf4"),
}


def save_random_model(hub_id, directory):
    """The real architecture with random bf16 weights, saved so every run loads it the same way,
    with a small tokenizer beside it (Unsloth's from_pretrained loads one; the bench's batches
    are token ids and never use it)."""
    from transformers import AutoConfig

    if (Path(directory) / "tokenizer.json").exists():
        return
    spec = dict(KNOWN_ARCHITECTURES[hub_id])
    architecture = spec.pop("architecture")
    model = random_init_model(AutoConfig.for_model(architecture, **spec))
    model.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    texts = ["the bench trains on random token ids", "a tokenizer for the loaders that want one"]
    train_tokenizer(texts, 300, chatml=architecture.startswith("qwen")).save_pretrained(directory)


def workloads_of(vocab_size, args, device="cuda"):
    """The workloads of one model: UltraChat lengths (with --ultrachat) first, then fixed. The
    same arguments give every process the same batches."""
    workloads = {}
    if args.ultrachat:
        lengths = conversation_lengths(args.ultrachat, args.seq_len)
        workloads["ultrachat"] = ultrachat_batches(vocab_size, args.batch, lengths,
                                                   args.warmup + args.steps, args.batch * args.seq_len,
                                                   device)
    workloads["fixed"] = fixed_batches(vocab_size, args.batch, args.seq_len, device)
    return workloads


def fixed_batches(vocab_size, batch, seq_len, device="cuda"):
    """One batch of `batch` x `seq_len` random tokens, every token a target: padded (here: no
    padding) for the baseline, packed for the trainer."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    examples = [(row.tolist(), row.tolist()) for row in input_ids]
    return {"padded": [collate(examples, 0, device)], "packed": [pack(examples, 0, device)]}


def conversation_lengths(jsonl_path, max_length):
    """Token lengths of real UltraChat conversations, estimated as characters / 4 (the models'
    real tokenizers are not available offline), capped at max_length as the pipeline truncates."""
    with open(jsonl_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [min(max_length, max(8, sum(len(m["content"]) for m in row["messages"]) // 4))
            for row in rows]


def ultrachat_batches(vocab_size, batch, lengths, count, batch_tokens, device="cuda"):
    """`count` batches of `batch` conversations with real lengths: padded for the baseline (what a
    hand-written script does), packed for the trainer, same tokens in both; and `count` packed
    batches of up to `batch_tokens` tokens of the same conversation stream (training.batch_tokens)."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    conversations = []
    for index in order:
        ids = torch.randint(0, vocab_size, (lengths[index],), generator=generator).tolist()
        conversations.append((ids, ids))
    padded, packed = [], []
    for start in range(0, batch * count, batch):
        examples = conversations[start : start + batch]
        padded.append(collate(examples, pad_id=0, device=device))
        packed.append(pack(examples, pad_id=0, device=device))
    budget = [pack(examples, pad_id=0, device=device)
              for examples, _ in zip(token_budget_batches(conversations, batch_tokens), range(count))]
    return {"padded": padded, "packed": packed, "budget": budget}


def sequence_lengths(batch):
    """The real (non-padding) length of each sequence in a padded or packed batch."""
    if "cu_seq_lens_q" in batch:
        return batch["cu_seq_lens_q"].diff().tolist()
    if "attention_mask" in batch:
        return batch["attention_mask"].sum(1).tolist()
    return [batch["input_ids"].size(1)] * batch["input_ids"].size(0)


def largest(batches):
    return max(batches, key=lambda batch: batch["input_ids"].numel())
