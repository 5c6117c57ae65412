"""The assistant-only loss mask (scripts/chat_format.py): which tokens are trained on, and
where a conversation longer than max_length is cut.

For each prompt format the pipeline supports, the labelled tokens, decoded, must be exactly the
assistant turns (plus the end-of-turn token), and the generation prompt must end where the
assistant's answer starts in training, token for token. (Templates in the styles of real model
families, and {% generation %} tags: test_chat_templates.py.)
"""

import pytest

from build_model import train_tokenizer
from bundled_sample import make_conversations
from chat_format import IGNORE_INDEX, PromptFormat, tokenize_conversation
from chat_styles import template
from modeling import load_tokenizer
from util import labelled_runs

# Role-tagged, not ChatML: checks the "jinja" kind (a template string in config.yaml).
JINJA_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<' + m['role'] + '>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)

HANDWRITTEN = {
    "single turn": [
        {"role": "user", "content": "Give me three tips for cooking pasta."},
        {"role": "assistant", "content": "The water should be salted, the pot large, and the pasta stirred."},
    ],
    "multi turn with system": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is LoRA?"},
        {"role": "assistant", "content": "Low-rank adapters on frozen weights."},
        {"role": "user", "content": "And QLoRA?"},
        {"role": "assistant", "content": "The same, on a 4-bit quantized base model."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ],
    "answer repeats the question": [
        {"role": "user", "content": "Say: hello world"},
        {"role": "assistant", "content": "hello world"},
    ],
}


@pytest.fixture(scope="module")
def bundled_rows():
    return make_conversations(n=200, seed=0)


@pytest.fixture(scope="module")
def bpe_tokenizers(bundled_rows):
    """The tokenizers build_model.py trains for the default's tiny models: {chatml: tokenizer}."""
    texts = [m["content"] for row in bundled_rows for m in row["messages"]]
    return {chatml: train_tokenizer(texts, 2048, chatml=chatml) for chatml in (True, False)}


@pytest.fixture(scope="module")
def stories_tokenizer(shared_fixtures):
    return load_tokenizer(shared_fixtures / "stories260k")


FORMATS = ["chatml", "seed (byte-level BPE)", "seed (stories260k)", "jinja", "[INST] (stories260k)"]


@pytest.fixture(params=FORMATS)
def prompt_format(request, bpe_tokenizers):
    if request.param == "chatml":
        return PromptFormat(bpe_tokenizers[True], "chat_template")
    if request.param == "seed (byte-level BPE)":
        return PromptFormat(bpe_tokenizers[False], "chat_template")
    if request.param == "seed (stories260k)":
        return PromptFormat(request.getfixturevalue("stories_tokenizer"), "chat_template")
    if request.param == "[INST] (stories260k)":  # Mistral's template on a real sentencepiece tokenizer
        return PromptFormat(request.getfixturevalue("stories_tokenizer"), template("mistral"))
    return PromptFormat(bpe_tokenizers[False], JINJA_TEMPLATE)


def decoded_runs(prompt_format, messages, max_length=100_000):
    """The labelled runs as text. A leading space may come along: tokenizers merge the format's
    separator into the answer's first token ("▁The", "ĠThe"), which is then trained too."""
    input_ids, labels, _ = tokenize_conversation(prompt_format, messages, max_length)
    return [prompt_format.tokenizer.decode(run).lstrip(" ") for run in labelled_runs(input_ids, labels)]


def assistant_targets(prompt_format, messages):
    """What each assistant turn must decode to: its content and the end-of-turn token."""
    eos = prompt_format.tokenizer.eos_token
    return [m["content"] + eos for m in messages if m["role"] == "assistant"]


def conversations(bundled_rows):
    return [*HANDWRITTEN.values(), *(row["messages"] for row in bundled_rows[:40])]


def test_labelled_tokens_decode_to_exactly_the_assistant_turns(prompt_format, bundled_rows):
    for messages in conversations(bundled_rows):
        runs = decoded_runs(prompt_format, messages)
        assert runs == assistant_targets(prompt_format, messages), messages[0]["content"]


def test_user_and_system_tokens_are_unlabelled_but_kept_as_context(prompt_format):
    messages = HANDWRITTEN["multi turn with system"]
    input_ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
    decode = prompt_format.tokenizer.decode
    context = decode([t for t, label in zip(input_ids, labels) if label == IGNORE_INDEX])
    trained = decode([t for t, label in zip(input_ids, labels) if label != IGNORE_INDEX])
    for message in messages:
        if message["role"] == "assistant":
            assert message["content"] in trained
            assert message["content"] not in context
        else:
            assert message["content"] in context, message["role"]
            assert message["content"] not in trained, message["role"]


def run_ends(labels):
    """Token index after each labelled run: where each assistant turn (with its end) ends."""
    return [i + 1 for i, label in enumerate(labels)
            if label != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)]


def test_a_long_conversation_keeps_its_leading_whole_exchanges(prompt_format):
    messages = [m for m in HANDWRITTEN["multi turn with system"] if m["role"] != "system"]
    full_ids, full_labels, truncated = tokenize_conversation(prompt_format, messages, 100_000)
    assert not truncated
    ends = run_ends(full_labels)
    targets = assistant_targets(prompt_format, messages)
    # A budget that ends anywhere inside the second exchange keeps the first, with its end of
    # turn, and nothing of the second: no answer is cut off in the middle.
    for max_length in (ends[0], ends[0] + 1, ends[1] - 1):
        ids, labels, truncated = tokenize_conversation(prompt_format, messages, max_length)
        assert truncated and ids == full_ids[: ends[0]] and labels == full_labels[: ends[0]]
        assert decoded_runs(prompt_format, messages, max_length) == targets[:1]
    ids, labels, truncated = tokenize_conversation(prompt_format, messages, ends[2] - 1)
    assert truncated and ids == full_ids[: ends[1]]
    assert decoded_runs(prompt_format, messages, ends[2] - 1) == targets[:2]
    # Exactly max_length tokens is not truncation.
    assert tokenize_conversation(prompt_format, messages, len(full_ids)) == (full_ids, full_labels, False)


def test_a_first_answer_longer_than_the_budget_is_cut_inside_it(prompt_format):
    messages = HANDWRITTEN["multi turn with system"]
    full_ids, full_labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
    first_trained = next(i for i, label in enumerate(full_labels) if label != IGNORE_INDEX)
    ids, labels, truncated = tokenize_conversation(prompt_format, messages, first_trained + 3)
    assert truncated and ids == full_ids[: first_trained + 3] and labels == full_labels[: first_trained + 3]
    [run] = decoded_runs(prompt_format, messages, first_trained + 3)
    assert assistant_targets(prompt_format, messages)[0].startswith(run) and run
    # A prompt that does not fit leaves nothing to train on (the tokenize step drops it).
    _, labels, truncated = tokenize_conversation(prompt_format, messages, first_trained)
    assert truncated and set(labels) == {IGNORE_INDEX}


def test_generation_prompt_ends_where_the_answer_starts(prompt_format):
    """The prompt's tokens are the training tokens up to the first trained one."""
    user = HANDWRITTEN["single turn"][0]["content"]
    for answer in ("The water should be salted.", "Hello! Sure.", "1. Boil water."):
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        text, spans = prompt_format.render(messages)
        prompt = prompt_format.generation_prompt(user)
        assert text.startswith(prompt) and spans[0][0] == len(prompt)

        tokenizer = prompt_format.tokenizer
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert ids[:first_trained] == prompt_ids, (answer, tokenizer.convert_ids_to_tokens(ids))


def test_without_chat_template_falls_back_to_seed_format(bpe_tokenizers):
    plain = PromptFormat(bpe_tokenizers[False], "chat_template")
    assert plain.kind == "seed"
    assert "no chat template" in plain.fallback_reason
    assert "fallback" in plain.describe()
    text, _ = plain.render(HANDWRITTEN["single turn"])
    assert "### USER: Give me three tips" in text and "### Assistant: The water" in text

    chatml = PromptFormat(bpe_tokenizers[True], "chat_template")
    assert chatml.kind == "chat_template" and chatml.fallback_reason is None
    assert chatml.render(HANDWRITTEN["single turn"])[0].startswith("<|im_start|>user\n")

    # Asked for explicitly, the seed format is no fallback, even where a template exists.
    seed = PromptFormat(bpe_tokenizers[True], "seed")
    assert seed.kind == "seed" and seed.fallback_reason is None


def test_stories260k_has_no_template_and_falls_back(stories_tokenizer):
    prompt_format = PromptFormat(stories_tokenizer, "chat_template")
    assert prompt_format.kind == "seed"
    assert prompt_format.fallback_reason == "the tokenizer has no chat template"


def test_jinja_prompt_format_that_does_not_parse_is_a_clear_error(bpe_tokenizers):
    with pytest.raises(ValueError, match="Jinja chat template, but it does not parse"):
        PromptFormat(bpe_tokenizers[False], "{% for m in messages %}{{ m['content'] }}")


def test_template_that_rewrites_content_is_refused(bpe_tokenizers):
    """Content the template changes cannot be located, so it must not be silently mislabelled."""
    shouting = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="does not reproduce message 0"):
        PromptFormat(bpe_tokenizers[False], shouting)


def test_an_answer_that_also_appears_in_the_template_header_is_found_in_the_answer(bpe_tokenizers):
    tokenizer = bpe_tokenizers[True]
    messages = [
        {"role": "user", "content": "Which role do you play here? One word."},
        {"role": "assistant", "content": "assistant"},
    ]
    text, spans = PromptFormat(tokenizer, "chat_template").render(messages)
    [(start, end)] = spans
    assert text[start:end] == "assistant<|im_end|>"
    assert text[:start].endswith("<|im_start|>assistant\n")
