"""The trainer's loss is the standard next-token loss on labelled (assistant) tokens only."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from batches import collate, model_inputs, pack, target_count
from chat_format import IGNORE_INDEX
from step import accumulate, token_loss_sums


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


def test_a_padded_batch_trains_as_transformers_does_with_its_padding_mask():
    """The trainer does not give the model collate's padding mask (batches.model_inputs): the
    loss and every gradient are transformers' own with the mask."""
    torch.manual_seed(1)
    examples = []
    for length in (5, 12, 9):
        ids = torch.randint(1, 97, (length,)).tolist()
        examples.append((ids, [IGNORE_INDEX] * 3 + ids[3:]))  # a "user turn", then targets
    batch = collate(examples, pad_id=0, device=torch.device("cpu"))
    assert "attention_mask" not in model_inputs(batch) and (batch["attention_mask"] == 0).any()

    def loss_and_grads(loss_of):
        model = tiny_model()
        loss = loss_of(model)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    def ours(model):
        loss_sum, _, count = token_loss_sums(model(**model_inputs(batch)).logits, batch["labels"])
        return loss_sum / count

    loss, grads = loss_and_grads(ours)
    reference, reference_grads = loss_and_grads(lambda model: model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss)
    assert torch.allclose(loss, reference, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, reference_grads[name], atol=1e-6), name


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


def uneven_conversations():
    """8 conversations; the first four hold far fewer targets than the last four."""
    generator = torch.Generator().manual_seed(2)
    conversations = []
    for index, length in enumerate((9, 6, 11, 7, 14, 10, 13, 12)):
        ids = torch.randint(0, 97, (length,), generator=generator).tolist()
        prompt = length - 2 if index < 4 else 2  # where the answer starts
        conversations.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return conversations


@pytest.mark.parametrize("make_batch", [collate, pack])
def test_two_micro_batches_of_4_train_like_one_batch_of_8(make_batch):
    """training.grad_accum 2 with batch_size 4 gives the loss and LoRA gradients of one batch of
    8: the window's summed token loss over all its targets, whatever each micro-batch holds."""
    from speedups import attach_lora

    model = attach_lora(tiny_model(), {"r": 2, "alpha": 4, "dropout": 0.0,
                                       "target_modules": ["q_proj", "v_proj", "down_proj"]},
                        gradient_checkpointing=False)
    model.train()
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would leave A without a gradient
            torch.nn.init.normal_(param, std=0.5)
    conversations = uneven_conversations()

    def window_and_grads(*micro_batches):
        model.zero_grad(set_to_none=True)
        batches = [make_batch(examples, pad_id=0, device="cpu") for examples in micro_batches]
        window = accumulate(model, batches)
        assert window.targets == sum(target_count(batch) for batch in batches)  # known up front
        return window, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    halves, halves_grads = window_and_grads(conversations[:4], conversations[4:])
    whole, whole_grads = window_and_grads(conversations)
    assert (halves.correct, halves.targets, halves.tokens) == (whole.correct, whole.targets, whole.tokens)
    assert halves.loss == pytest.approx(whole.loss, abs=1e-6)
    assert all(grad.abs().sum() > 0 for grad in whole_grads)
    for accumulated, one_batch in zip(halves_grads, whole_grads):
        assert torch.allclose(accumulated, one_batch, atol=1e-6)
    # the micro-batches' mean losses, weighted equally, would not be the batch's loss
    means = [window_and_grads(half)[0].loss for half in (conversations[:4], conversations[4:])]
    assert abs(sum(means) / 2 - whole.loss) > 1e-3
