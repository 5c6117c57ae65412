"""Chat templates written in the styles of real model families, and tokenizers to go with them.

Each style follows its family's published template where it matters for the loss mask: the
markers around a message, what closes an assistant turn, `| trim` on content, Gemma's "model"
role and system prompt folded into the first user turn (also Mistral's), Phi-3's eos after the
last turn, Mistral's alternation check, Qwen3's empty <think> block before an answer after the last user
message and in the generation prompt. Where the end of turn is not the tokenizer's eos, eos is
set to what the family's base tokenizers use.

`<G>`/`</G>` mark what a template author would declare as the assistant's text:
`template(style, tagged=True)` makes them `{% generation %}`/`{% endgeneration %}`.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

STYLES = {
    "chatml": {
        "eos": "<|endoftext|>", "bos": None, "turn_end": "<|im_end|>",
        "special": ["<|im_start|>", "<|im_end|>"],
        "template": (
            "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['role'] == 'assistant' %}<G>{{ message['content'] + '<|im_end|>' }}</G>"
            "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
        ),
    },
    "llama3": {
        "eos": "<|end_of_text|>", "bos": "<|begin_of_text|>", "turn_end": "<|eot_id|>",
        "special": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "template": (
            "{{ bos_token }}{% for message in messages %}"
            "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
            "{% if message['role'] == 'assistant' %}<G>{{ message['content'] | trim + '<|eot_id|>' }}</G>"
            "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
        ),
    },
    "gemma": {
        "eos": "<eos>", "bos": "<bos>", "turn_end": "<end_of_turn>",
        "special": ["<start_of_turn>", "<end_of_turn>"],
        "template": (
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
            "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
            "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
            "{% for message in loop_messages %}"
            "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
            "{{ '<start_of_turn>' + role + '\\n' }}"
            "{% if message['role'] == 'assistant' %}<G>{{ message['content'] | trim + '<end_of_turn>' }}</G>"
            "{% else %}{{ (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>' }}"
            "{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
        ),
    },
    "phi3": {
        # The conversation ends with eos, so the last turn closes with "<|end|>\n<|endoftext|>".
        "eos": "<|endoftext|>", "bos": None, "turn_end": "<|end|>",
        "special": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        "template": (
            "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' }}"
            "{% if message['role'] == 'assistant' %}<G>{{ message['content'] + '<|end|>' }}"
            "{% if loop.last and not add_generation_prompt %}{{ '\\n' + eos_token }}{% endif %}</G>"
            "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
            "{% else %}{{ message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}"
            "{% elif messages[-1]['role'] != 'assistant' %}{{ eos_token }}{% endif %}"
        ),
    },
    "mistral": {
        # A system message goes in front of the first question, as [INST] templates fold it.
        "eos": "</s>", "bos": "<s>", "turn_end": "</s>",
        "special": ["[INST]", "[/INST]"],
        "template": (
            "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
            "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
            "{% for message in loop_messages %}"
            "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
            "{% if message['role'] == 'user' %}"
            "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
            "{% elif message['role'] == 'assistant' %}<G>{{ message['content'] + eos_token }}</G>"
            "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
            "{% endfor %}"
        ),
    },
    "qwen3": {
        "eos": "<|endoftext|>", "bos": None, "turn_end": "<|im_end|>",
        "special": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        "template": (
            "{%- set ns = namespace(last_query_index=0) %}"
            "{%- for message in messages %}{%- if message.role == 'user' %}"
            "{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}"
            "{%- for message in messages %}{%- if message.role == 'assistant' %}"
            "{{- '<|im_start|>assistant\\n' }}"
            "{%- if loop.index0 > ns.last_query_index %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
            "<G>{{- message.content + '<|im_end|>' }}</G>{{- '\\n' }}"
            "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
            "{%- endif %}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
            "{%- if enable_thinking is defined and enable_thinking is false %}"
            "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
        ),
    },
}


def template(style, tagged=False):
    text = STYLES[style]["template"]
    return (text.replace("<G>", "{% generation %}" if tagged else "")
                .replace("</G>", "{% endgeneration %}" if tagged else ""))


def train_byte_level_bpe(texts):
    """One byte-level BPE with every style's markers as single special tokens."""
    special = sorted({
        token for style in STYLES.values()
        for token in [*style["special"], style["eos"], style["bos"]] if token
    })
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def style_tokenizer(bpe, style, tagged=False):
    """A transformers tokenizer with the style's eos/bos and chat template."""
    spec = STYLES[style]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=spec["eos"], bos_token=spec["bos"])
    tokenizer.chat_template = template(style, tagged)
    return tokenizer
