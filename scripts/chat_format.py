"""Conversations to training tokens: prompt formats and the assistant-only loss mask.

Which tokens are trained on is decided by message role, not by template markers: the whole
conversation is rendered once, each message's content is located in the rendered text, and a
token gets a label if it overlaps an assistant message's content (also one that merges the
format's space with the first word, like sentencepiece's "▁Hello"; plus the end-of-turn token
that directly follows it, so the model learns to stop). Everything else is -100. This
works for any chat template, also ones without `{% generation %}` tags (Qwen3's, which breaks
TRL's `assistant_only_loss`), and for base models with no template at all (the seed format).
"""

import re

import jinja2

IGNORE_INDEX = -100

# The seed notes' format: "### USER: {user}### Assistant: {assistant}".
SEED_USER = "### USER: "
SEED_ASSISTANT = "### Assistant: "
SEED_SYSTEM = "### SYSTEM: "


class PromptFormat:
    """How one model's conversations become text.

    kind is "chat_template" (the tokenizer's), "jinja" (a template string from config.yaml) or
    "seed". `fallback_reason` says why a requested chat template was replaced by the seed format.
    """

    def __init__(self, tokenizer, requested="chat_template"):
        self.tokenizer = tokenizer
        self.requested = requested
        self.fallback_reason = None
        if requested == "seed":
            self.kind, self.template = "seed", None
        elif requested == "chat_template":
            if tokenizer.chat_template:
                self.kind, self.template = "chat_template", None
            else:
                self.kind, self.template = "seed", None
                self.fallback_reason = "the tokenizer has no chat template"
        else:
            self.kind, self.template = "jinja", requested
            try:
                jinja2.Environment().parse(requested)
            except jinja2.TemplateSyntaxError as error:
                raise ValueError(
                    f"prompt_format is neither 'chat_template' nor 'seed', so it is read as a "
                    f"Jinja chat template, but it does not parse: {error}"
                ) from error

    def describe(self):
        if self.fallback_reason:
            return f"seed format (fallback: {self.fallback_reason})"
        return {"seed": "seed format", "chat_template": "tokenizer chat template",
                "jinja": "Jinja template from config"}[self.kind]

    def render(self, messages, add_generation_prompt=False):
        """Return (text, assistant_spans): spans are (start, end) character ranges to train on."""
        if self.kind == "seed":
            return self._render_seed(messages, add_generation_prompt)
        text = self._apply_template(messages, add_generation_prompt)
        return text, self._locate_assistant_spans(text, messages)

    def _apply_template(self, messages, add_generation_prompt):
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            # Qwen3's template would otherwise open a <think> block at generation time, which
            # training (rendered without reasoning) never showed the model. Others ignore it.
            enable_thinking=False,
        )

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

    def _locate_assistant_spans(self, text, messages):
        cursor, spans = 0, []
        eos = self.tokenizer.eos_token
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
                raise ValueError(
                    f"the prompt format does not reproduce message {index} ({message['role']}) "
                    "verbatim, so its tokens cannot be told apart; use prompt_format: seed or a "
                    "template that keeps message content unchanged"
                )
            end = start + len(content)
            if message["role"] == "assistant":
                # Train on the end-of-turn token too, so generation learns where to stop.
                if eos:
                    after_eos = re.match(r"\s*" + re.escape(eos), text[end:])
                    if after_eos:
                        end += after_eos.end()
                spans.append((start, end))
            cursor = end
        return spans

    def generation_prompt(self, prompt):
        text, _ = self.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return text


def tokenize_conversation(prompt_format, messages, max_length):
    """Token ids and labels for one conversation, truncated to max_length.

    Returns (input_ids, labels, truncated). labels[i] == input_ids[i] where token i overlaps
    an assistant span, else IGNORE_INDEX.
    """
    text, spans = prompt_format.render(messages)
    encoding = prompt_format.tokenizer(
        text, add_special_tokens=False, return_offsets_mapping=True
    )
    input_ids = encoding["input_ids"]
    labels = [
        token if any(token_start < end and token_end > start for start, end in spans) else IGNORE_INDEX
        for token, (token_start, token_end) in zip(input_ids, encoding["offset_mapping"])
    ]
    truncated = len(input_ids) > max_length
    return input_ids[:max_length], labels[:max_length], truncated
