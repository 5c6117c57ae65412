"""The trainer's loss is the standard next-token loss on labelled (assistant) tokens only."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from chat_format import IGNORE_INDEX
from step import token_loss_sums


def tiny_model():
    config = AutoConfig.for_model(
        "llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_loss_equals_transformers_loss_with_masked_labels():
    model = tiny_model()
    input_ids = torch.randint(0, 97, (3, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # a "user turn" at the start
    labels[1, 9:] = IGNORE_INDEX  # padding at the end of one row
    logits = model(input_ids=input_ids).logits
    loss_sum, correct, count = token_loss_sums(logits, labels)
    reference = model(input_ids=input_ids, labels=labels).loss
    assert count.item() == (labels[:, 1:] != IGNORE_INDEX).sum().item()
    assert torch.allclose(loss_sum / count, reference, atol=1e-6)
    predictions = logits[:, :-1].argmax(-1)
    expected_correct = ((predictions == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)).sum()
    assert correct.item() == expected_correct.item()


def test_masked_tokens_get_no_gradient_signal():
    model = tiny_model()
    input_ids = torch.randint(0, 97, (1, 10))
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, 6] = input_ids[0, 6]  # a single target token
    logits = model(input_ids=input_ids).logits
    logits.retain_grad()
    loss_sum, _, count = token_loss_sums(logits, labels)
    (loss_sum / count).backward()
    rows_with_gradient = (logits.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert rows_with_gradient == [5]  # only the position that predicts token 6


def test_packed_batch_gives_each_conversation_the_loss_it_has_alone():
    from batches import collate, pack
    from step import forward_backward

    model = tiny_model()
    torch.manual_seed(1)
    examples = []
    for length in (7, 12, 4):
        ids = torch.randint(0, 97, (length,)).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]  # a prompt, then an answer
        examples.append((ids, labels))

    def loss_and_grads(batch):
        model.zero_grad()
        loss, correct, targets, tokens = forward_backward(model, batch)
        grads = [p.grad.clone() for p in model.parameters()]
        return loss, correct, targets, tokens, grads

    padded = loss_and_grads(collate(examples, pad_id=0, device="cpu"))
    packed = loss_and_grads(pack(examples, pad_id=0, device="cpu"))
    assert packed[1:3] == padded[1:3]  # same targets, same correct predictions
    assert packed[3] == padded[3] == 7 + 12 + 4  # padding-free: only real tokens
    assert abs(packed[0] - padded[0]) < 1e-5
    for packed_grad, padded_grad in zip(packed[4], padded[4]):
        assert torch.allclose(packed_grad, padded_grad, atol=1e-5)
    # and each conversation alone: the mean of per-conversation loss sums equals the batch loss
    alone = [loss_and_grads(collate([example], pad_id=0, device="cpu")) for example in examples]
    total = sum(loss * targets for loss, _, targets, _, _ in alone) / sum(t for _, _, t, _, _ in alone)
    assert abs(packed[0] - total) < 1e-5
