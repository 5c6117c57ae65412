"""Conversations to training tokens: prompt formats, the assistant-only loss mask, and truncation
at turn boundaries.

Which tokens are trained on (get a label; every other token is -100):
- A template with `{% generation %}...{% endgeneration %}` blocks declares what the assistant
  wrote: its blocks are the labels, token for token what transformers'
  `apply_chat_template(..., return_assistant_tokens_mask=True)` marks. The tokenize step also
  computes the role-based labels below and logs where the two differ.
- Any other template, and the seed format, are labelled by message role: the conversation is
  rendered once, each message's content is located in the rendered text, and a token is labelled
  if it overlaps an assistant message's content (also one that merges the format's space with the
  first word, like sentencepiece's "▁Hello") or the text the template renders to close that turn,
  whatever it is (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`, `</s>`), so the model
  learns to stop. This works for templates without generation markers (Qwen3's, which breaks
  TRL's `assistant_only_loss`) and for base models with no template at all (the seed format).

A conversation longer than max_length keeps its leading complete exchanges that fit; only a first
answer longer than that is cut inside the answer.
"""

import re

import jinja2

from errors import LoranotesError

IGNORE_INDEX = -100

# The seed notes' format: "### USER: {user}### Assistant: {assistant}".
SEED_USER = "### USER: "
SEED_ASSISTANT = "### Assistant: "
SEED_SYSTEM = "### SYSTEM: "

# How transformers tells that a template declares the assistant's text itself.
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Two exchanges every chat template can render: where the first answer ends tells what closes a
# turn in the middle of a conversation, the second what closes the last one.
PROBE = [
    {"role": "user", "content": "What is one plus one?"},
    {"role": "assistant", "content": "One plus one is two."},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "Two plus two is four."},
]


class PromptFormatError(LoranotesError, ValueError):
    """A prompt format that cannot be used to tell assistant tokens apart, and what to do."""


def template_problem(template):
    """Why a Jinja chat template cannot be used (it does not parse or cannot render a plain
    conversation, as transformers renders it, `{% generation %}` included), or None."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        render_jinja_template(conversations=[PROBE], chat_template=template, bos_token="", eos_token="")
    except jinja2.TemplateError as error:
        return f"{type(error).__name__}: {error}"
    return None


class PromptFormat:
    """How one model's conversations become text, and which of its characters are trained on.

    kind is "chat_template" (the tokenizer's), "jinja" (a template string from config.yaml) or
    "seed". `fallback_reason` says why a requested chat template was replaced by the seed format.
    `generation_tags`: the template declares the assistant's text itself (the labels come from
    it). `turn_end` is the text that closes an assistant turn, `last_turn_end` the one that closes
    the conversation's last turn (the same in most templates; Phi-3's adds its eos).
    """

    def __init__(self, tokenizer, requested="chat_template"):
        self.tokenizer = tokenizer
        self.requested = requested
        self.fallback_reason = None
        self.template = None
        if requested == "seed":
            self.kind = "seed"
        elif requested == "chat_template":
            if tokenizer.chat_template:
                self.kind, self.template = "chat_template", tokenizer.get_chat_template()
            else:
                self.kind = "seed"
                self.fallback_reason = "the tokenizer has no chat template"
        else:
            self.kind, self.template = "jinja", requested
        self.generation_tags = bool(self.template and GENERATION_TAG.search(self.template))
        self.turn_end, self.last_turn_end = self._probe_turn_ends()

    def describe(self):
        if self.fallback_reason:
            return f"seed format (fallback: {self.fallback_reason})"
        return {"seed": "seed format", "chat_template": "tokenizer chat template",
                "jinja": "Jinja template from config"}[self.kind]

    @property
    def labels(self):
        """Where the labels come from: "generation tags" or "roles"."""
        return "generation tags" if self.generation_tags else "roles"

    def render(self, messages, add_generation_prompt=False):
        """Return (text, assistant_spans): spans are (start, end) character ranges to train on."""
        if self.kind == "seed":
            return self._render_seed(messages, add_generation_prompt)
        text = self._apply_template(messages, add_generation_prompt)
        if self.generation_tags:
            return text, self._generation_spans(messages, add_generation_prompt)
        return text, self.role_spans(text, messages)

    def role_spans(self, text, messages):
        """Each assistant message's content and the text that closes its turn, located in text."""
        return [(start, close_end) for start, _, close_end in self._assistant_turns(text, messages)]

    def generation_prompt(self, prompt):
        text, _ = self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return text

    def stop_token_ids(self):
        """Token ids that end an answer: eos, and the turn end where it is one token of its own
        (`<|im_end|>` where eos is `<|endoftext|>`, Gemma's `<end_of_turn>`)."""
        ids = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        turn_end = self.tokenizer(self.turn_end.strip(), add_special_tokens=False)["input_ids"]
        if len(turn_end) == 1 and turn_end[0] not in ids:
            ids.append(turn_end[0])
        return ids

    def _apply_template(self, messages, add_generation_prompt=False):
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                # Qwen3's template would otherwise open a <think> block at generation time,
                # which training (rendered without reasoning) never showed the model.
                enable_thinking=False,
            )
        except jinja2.TemplateError as error:
            source = ("prompt_format is neither 'chat_template' nor 'seed', so it is read as a Jinja "
                      "chat template" if self.kind == "jinja" else "the tokenizer's chat template")
            failure = "does not parse" if isinstance(error, jinja2.TemplateSyntaxError) else "fails"
            raise PromptFormatError(f"{source}, but it {failure}: {error}") from error

    def _generation_spans(self, messages, add_generation_prompt):
        """The template's {% generation %} blocks, as transformers' assistant mask marks them:
        the characters of each run of marked tokens in the rendered text."""
        encoded = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=True, return_dict=True,
            add_generation_prompt=add_generation_prompt, return_assistant_tokens_mask=True,
            enable_thinking=False,
            tokenizer_kwargs={"return_offsets_mapping": True},
        )
        spans, previous = [], False
        for marked, (start, end) in zip(encoded["assistant_masks"], encoded["offset_mapping"]):
            if marked and previous:
                spans[-1] = (spans[-1][0], end)
            elif marked:
                spans.append((start, end))
            previous = marked
        return spans

    def _render_seed(self, messages, add_generation_prompt):
        bos = self.tokenizer.bos_token or ""
        eos = self.tokenizer.eos_token or ""
        text, spans = bos, []
        for message in messages:
            if message["role"] == "system":
                text += SEED_SYSTEM + message["content"]
            elif message["role"] == "user":
                text += SEED_USER + message["content"]
            else:
                # The space after "Assistant:" is trained and left out of generation prompts:
                # tokenizers merge it into the answer's first token ("▁The", "ĠThe").
                text += SEED_ASSISTANT.rstrip()
                start = len(text)
                text += " " + message["content"] + eos
                spans.append((start, len(text)))
        if add_generation_prompt:
            text += SEED_ASSISTANT.rstrip()
        return text, spans

    def _probe_turn_ends(self):
        """(turn_end, last_turn_end) of this format, from rendering PROBE."""
        if self.kind == "seed":
            eos = self.tokenizer.eos_token or ""
            return eos, eos
        text = self._apply_template(PROBE)
        try:
            turns = self._assistant_turns(text, PROBE)
        except PromptFormatError:
            if self.generation_tags:  # its own blocks label it; what closes a turn is unknown
                return "", ""
            raise
        return tuple(text[content_end:close_end] for _, content_end, close_end in turns)

    def _message_contents(self, text, messages):
        """(start, end) of each message's content in text, in order."""
        cursor, found = 0, []
        for index, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "assistant":
                # Skip the assistant header, which could contain the answer's text (an answer
                # "assistant" in ChatML): the generation prompt of the conversation so far ends
                # where the answer starts, when the template renders prefixes consistently.
                prefix = self._apply_template(messages[:index], add_generation_prompt=True)
                if text.startswith(prefix):
                    cursor = max(cursor, len(prefix))
            start = text.find(content, cursor)
            if start < 0:  # templates may trim whitespace around content
                content = content.strip()
                start = text.find(content, cursor)
            if start < 0:
                raise PromptFormatError(
                    f"the prompt format does not reproduce message {index} ({message['role']}) "
                    "verbatim, so its tokens cannot be told apart; use prompt_format: seed or a "
                    "template that keeps message content unchanged"
                )
            found.append((start, start + len(content)))
            cursor = start + len(content)
        return found

    def _assistant_turns(self, text, messages):
        """(content start, content end, close end) of each assistant message in text."""
        contents = self._message_contents(text, messages)
        return [
            (start, end, end + len(self._turn_close(text, end, messages, index)))
            for index, (message, (start, end)) in enumerate(zip(messages, contents))
            if message["role"] == "assistant"
        ]

    def _turn_close(self, text, end, messages, index):
        """The text after assistant message `index` (ending at `end`) that closes its turn: what
        the template renders after the answer whether or not the conversation goes on, up to
        the next message, without trailing whitespace. After the last message, all the rest."""
        if index == len(messages) - 1:
            return text[end:].rstrip()
        ending_here = self._apply_template(messages[: index + 1])
        if ending_here.startswith(text[:end]):
            end_there = end
        else:  # the template renders a last answer differently (Qwen3's empty <think> block)
            end_there = self._message_contents(ending_here, messages[: index + 1])[-1][1]
        after = ending_here[end_there:]
        return self._shared_start(text[end : end + len(after)], after).rstrip()

    def _shared_start(self, here, there):
        """The longest start that two texts share, in whole tokens. Where they part, only up to
        the last whitespace before: the next turn's marker ("<|user|>") may begin with the same
        characters as what ends a conversation ("<|endoftext|>")."""
        if here == there:
            return here
        here_tokens = self.tokenizer(here, add_special_tokens=False, return_offsets_mapping=True)
        there_ids = self.tokenizer(there, add_special_tokens=False)["input_ids"]
        shared = 0
        for a, b in zip(here_tokens["input_ids"], there_ids):
            if a != b:
                break
            shared += 1
        start = here[: here_tokens["offset_mapping"][shared - 1][1]] if shared else ""
        last_space = max((match.start() for match in re.finditer(r"\s", start)), default=None)
        return start[:last_space] if last_space is not None else start


def label_tokens(tokenizer, text, spans):
    """(input_ids, labels) of text: a token is labelled (with its own id) if it overlaps a span."""
    # verbose=False: no "longer than the maximum sequence length" warning; truncation follows.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    input_ids = encoding["input_ids"]
    labels = [
        token if any(token_start < end and token_end > start for start, end in spans) else IGNORE_INDEX
        for token, (token_start, token_end) in zip(input_ids, encoding["offset_mapping"])
    ]
    return input_ids, labels


def turn_boundary(labels, max_length):
    """Where to cut a sequence longer than max_length: after the last labelled run (an assistant
    turn with its end of turn) that ends within max_length; max_length when none does."""
    ends = [
        i + 1 for i in range(min(max_length, len(labels)))
        if labels[i] != IGNORE_INDEX and (i + 1 == len(labels) or labels[i + 1] == IGNORE_INDEX)
    ]
    return ends[-1] if ends else max_length


def tokenize_conversation(prompt_format, messages, max_length):
    """Token ids and labels for one conversation, at most max_length of them.

    Returns (input_ids, labels, truncated). labels[i] == input_ids[i] where token i overlaps an
    assistant span, else IGNORE_INDEX. A conversation longer than max_length (truncated) keeps
    its leading complete exchanges that fit; if even the first answer does not fit, it is cut
    inside that answer, and if its prompt does not fit, no label is left.
    """
    text, spans = prompt_format.render(messages)
    input_ids, labels = label_tokens(prompt_format.tokenizer, text, spans)
    if len(input_ids) <= max_length:
        return input_ids, labels, False
    cut = turn_boundary(labels, max_length)
    return input_ids[:cut], labels[:cut], True


def labels_unlike_roles(prompt_format, messages):
    """Where a template's {% generation %} labels differ from the role-based ones: None, or
    (text only the template labels, text only the roles label), decoded."""
    text, spans = prompt_format.render(messages)
    input_ids, by_template = label_tokens(prompt_format.tokenizer, text, spans)
    try:
        _, by_role = label_tokens(prompt_format.tokenizer, text, prompt_format.role_spans(text, messages))
    except PromptFormatError:
        by_role = [IGNORE_INDEX] * len(input_ids)  # content not verbatim: nothing located by role
    if by_template == by_role:
        return None
    decode = prompt_format.tokenizer.decode
    only_template = [t for t, a, b in zip(input_ids, by_template, by_role) if a != IGNORE_INDEX == b]
    only_roles = [t for t, a, b in zip(input_ids, by_template, by_role) if b != IGNORE_INDEX == a]
    return decode(only_template), decode(only_roles)
