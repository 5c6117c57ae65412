"""Chat templates as real models bring them (scripts/chat_format.py): the end of an assistant
turn is trained whatever the template closes it with, `{% generation %}` blocks decide the labels
where a template has them, exactly as transformers' assistant mask marks them.

Templates are written in the styles of ChatML, Llama-3, Gemma, Phi-3, Mistral and Qwen3 (see
chat_styles.py); in most of them the end of turn is not the tokenizer's eos.
"""

import pytest

from bundled_sample import make_conversations
from chat_format import (
    IGNORE_INDEX,
    PromptFormat,
    labels_unlike_roles,
    template_problem,
    tokenize_conversation,
)
from chat_styles import STYLES, style_tokenizer, template, train_byte_level_bpe
from test_masking import HANDWRITTEN
from tokenize_data import tokenize_split
from util import labelled_runs

SYSTEM_CONVERSATION = HANDWRITTEN["multi turn with system"]


@pytest.fixture(scope="module")
def bundled_rows():
    return make_conversations(n=120, seed=0)


@pytest.fixture(scope="module")
def bpe(bundled_rows):
    return train_byte_level_bpe([m["content"] for row in bundled_rows for m in row["messages"]])


def conversations(bundled_rows):
    return [*(row["messages"] for row in bundled_rows[:30]), SYSTEM_CONVERSATION]


def decoded_runs(prompt_format, messages):
    input_ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
    return [prompt_format.tokenizer.decode(run) for run in labelled_runs(input_ids, labels)]


def expected_runs(style, messages, last_turn_end):
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    turn_end = STYLES[style]["turn_end"]
    return [answer + turn_end for answer in answers[:-1]] + [answers[-1] + last_turn_end]


@pytest.mark.parametrize("style", STYLES)
def test_every_answer_and_the_text_that_closes_its_turn_are_labelled(style, bpe, bundled_rows):
    prompt_format = PromptFormat(style_tokenizer(bpe, style))
    assert prompt_format.kind == "chat_template" and not prompt_format.generation_tags
    assert prompt_format.turn_end == STYLES[style]["turn_end"]
    # Phi-3 ends a conversation with eos: the last turn's close takes it along.
    last_turn_end = "<|end|>\n<|endoftext|>" if style == "phi3" else STYLES[style]["turn_end"]
    assert prompt_format.last_turn_end == last_turn_end
    for messages in conversations(bundled_rows):
        assert decoded_runs(prompt_format, messages) == expected_runs(style, messages, last_turn_end)


@pytest.mark.parametrize("style", [s for s in STYLES if STYLES[s]["turn_end"] != STYLES[s]["eos"]])
def test_an_end_of_turn_that_is_not_eos_is_trained_and_stops_generation(style, bpe):
    tokenizer = style_tokenizer(bpe, style)
    prompt_format = PromptFormat(tokenizer)
    input_ids, labels, _ = tokenize_conversation(prompt_format, SYSTEM_CONVERSATION, 100_000)
    turn_end_id = tokenizer.convert_tokens_to_ids(STYLES[style]["turn_end"])
    trained = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert trained.count(turn_end_id) == 3  # one per answer
    assert prompt_format.stop_token_ids() == [tokenizer.eos_token_id, turn_end_id]


@pytest.mark.parametrize("style", STYLES)
def test_tagged_template_labels_exactly_what_transformers_marks(style, bpe, bundled_rows):
    """The same template with {% generation %} around each answer and its end: the labels are
    transformers' assistant mask, and the same as the role-based labels of the untagged one."""
    tagged = style_tokenizer(bpe, style, tagged=True)
    prompt_format = PromptFormat(tagged)
    by_role = PromptFormat(style_tokenizer(bpe, style))
    assert prompt_format.generation_tags and prompt_format.labels == "generation tags"
    for messages in conversations(bundled_rows):
        input_ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
        marked = tagged.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
            enable_thinking=False,
        )
        assert input_ids == marked["input_ids"]
        assert [int(label != IGNORE_INDEX) for label in labels] == marked["assistant_masks"]
        assert (input_ids, labels) == tokenize_conversation(by_role, messages, 100_000)[:2]
        assert labels_unlike_roles(prompt_format, messages) is None


def test_generation_tags_in_a_config_template_are_accepted(bpe):
    """A prompt_format string with {% generation %}: plain Jinja rejects the tag
    ("Encountered unknown tag 'generation'"); transformers' renderer knows it."""
    tokenizer = style_tokenizer(bpe, "chatml")
    prompt_format = PromptFormat(tokenizer, template("chatml", tagged=True))
    assert prompt_format.kind == "jinja" and prompt_format.generation_tags
    assert template_problem(template("chatml", tagged=True)) is None
    assert decoded_runs(prompt_format, SYSTEM_CONVERSATION) == [
        m["content"] + "<|im_end|>" for m in SYSTEM_CONVERSATION if m["role"] == "assistant"
    ]


def test_the_templates_declaration_decides_and_differences_from_roles_are_counted(bpe, bundled_rows):
    """Tags around the answer only, not its <|im_end|>: the template is followed, and the
    tokenize step counts (and shows) where that differs from labelling by role."""
    answer_only = STYLES["chatml"]["template"].replace(
        "<G>{{ message['content'] + '<|im_end|>' }}</G>",
        "{% generation %}{{ message['content'] }}{% endgeneration %}{{ '<|im_end|>' }}",
    )
    prompt_format = PromptFormat(style_tokenizer(bpe, "chatml"), answer_only)
    answers = [m["content"] for m in SYSTEM_CONVERSATION if m["role"] == "assistant"]
    assert decoded_runs(prompt_format, SYSTEM_CONVERSATION) == answers
    only_template, only_roles = labels_unlike_roles(prompt_format, SYSTEM_CONVERSATION)
    assert only_template == "" and only_roles == "<|im_end|>" * 3

    conversations = [{"id": str(i), "messages": row["messages"]} for i, row in enumerate(bundled_rows[:10])]
    _, counts = tokenize_split(prompt_format, conversations, 100_000)
    assert counts["unlike_roles"] == 10
    assert counts["unlike_roles_example"]["id"] == "0"
    assert counts["unlike_roles_example"]["only_roles"].startswith("<|im_end|>")


def test_tags_label_a_template_that_rewrites_content(bpe):
    """Role-based labels need the content verbatim; a template's own tags do not."""
    shouting = template("chatml", tagged=True).replace(
        "{% else %}{{ message['content'] + '<|im_end|>' }}",
        "{% else %}{{ message['content'] | upper + '<|im_end|>' }}",
    )
    with pytest.raises(ValueError, match="does not reproduce message"):
        PromptFormat(style_tokenizer(bpe, "chatml"), shouting.replace("{% generation %}", "")
                     .replace("{% endgeneration %}", ""))
    prompt_format = PromptFormat(style_tokenizer(bpe, "chatml"), shouting)
    assert decoded_runs(prompt_format, SYSTEM_CONVERSATION)[0] == "Low-rank adapters on frozen weights.<|im_end|>"


@pytest.mark.parametrize("tagged", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_generation_prompt_ends_where_the_trained_answer_starts(style, tagged, bpe):
    tokenizer = style_tokenizer(bpe, style, tagged)
    prompt_format = PromptFormat(tokenizer)
    question = "Give me three tips for cooking pasta."
    for answer in ("The water should be salted.", "Hello! Sure.", "1. Boil water."):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        prompt_ids = tokenizer(prompt_format.generation_prompt(question), add_special_tokens=False)["input_ids"]
        input_ids, labels, _ = tokenize_conversation(prompt_format, messages, 100_000)
        first_trained = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert input_ids[:first_trained] == prompt_ids, tokenizer.convert_ids_to_tokens(input_ids)


def test_qwen3_empty_think_block_is_context_not_target(bpe):
    """Qwen3 puts an empty <think> block before the answer after the last user message, and
    (enable_thinking=False) at the end of the generation prompt: it is never trained on."""
    prompt_format = PromptFormat(style_tokenizer(bpe, "qwen3"))
    text, _ = prompt_format.render(SYSTEM_CONVERSATION)
    assert text.count("<think>\n\n</think>\n\n") == 1
    assert prompt_format.generation_prompt("Hi").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not any("think>" in run for run in decoded_runs(prompt_format, SYSTEM_CONVERSATION))


def test_a_template_that_does_not_parse_is_one_clear_problem():
    problem = template_problem("{% for m in messages %}{{ m['content'] }}")
    assert problem.startswith("TemplateSyntaxError: ") and "endfor" in problem
