"""What the trainer feeds the model: tokenized conversations read back, batched (padded or
packed), in a seeded order, and which positions are targets.

A conversation is a pair (input_ids, labels) of equal length; a label is its own input token
where the loss applies (assistant tokens) and IGNORE_INDEX elsewhere.
"""

import math
import random

import pandas as pd
import torch
import torch.nn.functional as F

from chat_format import IGNORE_INDEX


def read_tokenized(path):
    frame = pd.read_parquet(path)
    return [(list(ids), list(labels)) for ids, labels in zip(frame["input_ids"], frame["labels"])]


def shifted_targets(labels):
    """What each position is trained to predict: the next token's label (position t predicts
    token t+1; the last position predicts nothing). The labels are shifted, not the logits:
    slicing the logits would copy the largest tensor of the step (batch x length x vocabulary,
    2.5 GB for Qwen3 at 4 x 1024) once more."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_count(batch):
    """How many positions of `batch` have a target: known before the forward pass."""
    return int((shifted_targets(batch["labels"]) != IGNORE_INDEX).sum())


def collate(examples, pad_id, device):
    """Right-pad a list of (input_ids, labels) into a batch on `device`."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {
        "input_ids": input_ids.to(device),
        "labels": labels.to(device),
        "attention_mask": attention_mask.to(device),
    }


def pack(examples, pad_id, device):
    """A batch as one padding-free row: the conversations back to back, positions restarting at 0
    for each. transformers sees the restarts in position_ids and keeps the conversations apart
    (a block-diagonal causal mask); on CUDA the conversations' offsets let attention run as
    variable-length flash attention instead (speedups.varlen_attention). No compute is spent
    on padding. `pad_id` is unused; it keeps the signature of `collate`.
    """
    input_ids, labels, position_ids = [], [], []
    for ids, labs in examples:
        input_ids += ids
        # Nothing may learn to predict a conversation's first token from the previous one.
        labels += [IGNORE_INDEX] + labs[1:]
        position_ids += range(len(ids))
    return {
        "input_ids": torch.tensor([input_ids], device=device),
        "labels": torch.tensor([labels], device=device),
        "position_ids": torch.tensor([position_ids], device=device),
        **packed_sequence_bounds([len(ids) for ids, _ in examples], device),
    }


def packed_sequence_bounds(lengths, device):
    """What variable-length attention needs for conversations of `lengths` packed in one row:
    cumulative offsets (int32, on the device) and the longest length."""
    offsets = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
    # transformers' names for these (its flash-attention kwargs); other attention ignores them
    return {"cu_seq_lens_q": offsets, "cu_seq_lens_k": offsets,
            "max_length_q": max(lengths), "max_length_k": max(lengths)}


# What model_inputs leaves out: the labels, and the mask of collate's padding (on the right).
NOT_MODEL_INPUTS = ("labels", "attention_mask")


def model_inputs(batch):
    """What the model gets from a batch made by `collate` or `pack`: everything but the labels
    and the padding mask, and no KV cache (training never decodes; a cache would cost memory
    and, for packed batches, hide the sequence boundaries from transformers' attention masking).

    Without the padding mask attention is plain causal attention, with no mask to build and
    apply, and the losses and gradients are the same: padding follows each conversation, so
    under the causal mask no conversation token sees a pad, and a pad's own output is never a
    target. A padded step of the embedded default on a CPU takes 0.96x (tiny Qwen3) and 0.93x
    (tiny Llama) as long, with the same loss (bench/cpu_padding_mask.py)."""
    return {**{key: value for key, value in batch.items() if key not in NOT_MODEL_INPUTS}, "use_cache": False}



def non_padding_tokens(batch):
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def batches_forever(examples, batch_size, seed, batch_tokens=None):
    """Shuffled batches, epoch after epoch; the order depends only on the seed.

    A batch is `batch_size` conversations or, with `batch_tokens`, as many as fit in that many
    tokens (see token_budget_batches). An epoch's last batch (partial with batch_size; with
    batch_tokens, always: it holds the leftovers) is dropped, unless it is the epoch's only one.
    """
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        shuffled = [examples[i] for i in order]
        if batch_tokens:
            epoch = list(token_budget_batches(shuffled, batch_tokens))
            yield from epoch[:-1] or epoch
        else:
            for start in range(0, max(len(order) - batch_size + 1, 1), batch_size):
                yield shuffled[start : start + batch_size]


def token_budget_batches(examples, batch_tokens):
    """Consecutive runs of `examples` of at most `batch_tokens` tokens each (a longer single
    conversation is a batch of its own). Packed, such a batch costs about the same every step
    however long its conversations are."""
    batch, tokens = [], 0
    for example in examples:
        if batch and tokens + len(example[0]) > batch_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(example)
        tokens += len(example[0])
    if batch:
        yield batch


def largest_batch(examples, training):
    """A batch at least as large as any of the run's: the longest conversations, as many as a
    batch holds; with batch_tokens, the longest that fit, topped up to exactly the budget with a
    cut conversation. The memory plan measures this one."""
    longest_first = sorted(examples, key=lambda example: len(example[0]), reverse=True)
    budget = training["batch_tokens"]
    if not budget:
        return longest_first[: training["batch_size"]]
    batch, rest, tokens = [], [], 0
    for example in longest_first:
        if not batch or tokens + len(example[0]) <= budget:
            batch.append(example)
            tokens += len(example[0])
        else:
            rest.append(example)
    room = budget - tokens
    if room > 0 and rest:
        ids, labels = rest[0]
        batch.append((ids[:room], labels[:room]))
    return batch


def balanced_shares(examples, count):
    """`examples` (one micro-batch) split into `count` disjoint shares of about equal tokens,
    one per data-parallel rank: longest first, each to the share with the fewest tokens so far
    (ties: the lowest rank), each share then in batch order. The slowest rank sets a step's
    pace, so shares are balanced by tokens, not by count. A share may be empty (fewer
    conversations than ranks)."""
    shares, tokens = [[] for _ in range(count)], [0] * count
    for index in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        lightest = tokens.index(min(tokens))
        shares[lightest].append(index)
        tokens[lightest] += len(examples[index][0])
    return [[examples[i] for i in sorted(share)] for share in shares]


def largest_share(examples, training, ranks):
    """A batch at least as large as any rank's share of the run's batches (balanced_shares over
    `ranks`), for the memory plan of each rank: with batch_size, the ceil(batch_size / ranks)
    longest conversations; with batch_tokens, largest_batch of a budget of a rank's fair part
    plus the longest conversation (the most a balanced share can exceed its part by)."""
    if ranks == 1:
        return largest_batch(examples, training)
    budget = training["batch_tokens"]
    if budget:
        longest = max(len(ids) for ids, _ in examples)
        share_budget = min(budget, math.ceil(budget / ranks) + longest)
        return largest_batch(examples, {**training, "batch_tokens": share_budget})
    return largest_batch(examples, {**training, "batch_size": math.ceil(training["batch_size"] / ranks)})
