"""Answer the config's fixed prompts with a base model (before) or base + adapter (after).

Greedy decoding by default, so a rerun gives the same text. "Before" runs once per base model
and quantization and is shared by every variant with that base.
"""

import json
import logging
import time

import torch

from chat_format import PromptFormat
from errors import configure_logging, entry_point
from model_sources import model_info
from modeling import load_base_model, load_tokenizer, pick_device
from trackers import reopen_trackers

log = logging.getLogger("loranotes.generate")


@torch.no_grad()
def generate_samples(model, prompt_format, prompts, max_new_tokens, device, no_repeat_ngram_size=0):
    """[{"prompt", "completion", "new_tokens"}] for each prompt; completions exclude the prompt.
    no_repeat_ngram_size > 0: no n-gram of that many tokens twice (transformers' option), which
    keeps a small model's greedy answer from looping past its end.

    All prompts go through generate() as one left-padded batch: one pass per new token instead
    of one per prompt and token.
    """
    tokenizer = prompt_format.tokenizer
    model.eval()
    tokenizer.padding_side = "left"  # new tokens must follow every prompt directly
    texts = [prompt_format.generation_prompt(prompt) for prompt in prompts]
    inputs = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(device)
    stop_ids = prompt_format.stop_token_ids()  # eos and the turn end training labelled
    started = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_ids,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )
    log.info("generated %d prompts x up to %d tokens in %.1f s", len(prompts), max_new_tokens,
             time.perf_counter() - started)
    samples = []
    for prompt, row in zip(prompts, output[:, inputs["input_ids"].shape[1]:]):
        row = row.tolist()
        stops = [index for index, token in enumerate(row) if token in stop_ids]
        if stops:  # generation stopped here; the rest is padding
            row = row[: stops[0] + 1]
        completion = tokenizer.decode(row, skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion, "new_tokens": len(row)})
        log.info("prompt: %r\n-> %r", prompt, completion)
    return samples


def load_for_generation(model_path, quantization, device, adapter=None, trust_remote_code=False):
    """The base model, with the LoRA adapter directory `adapter` on it where one is given."""
    model = load_base_model(model_path, quantization, device, trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        if quantization == "none":
            # Folding the adapter into the weights gives the same outputs, faster. (Merging into
            # nf4 weights would re-quantize them, so quantized models keep the adapter separate.)
            model = model.merge_and_unload()
    return model


@entry_point
def main(snakemake):
    configure_logging(snakemake)
    torch.set_num_threads(snakemake.threads)
    params = snakemake.params
    device = pick_device(params.device)
    tokenizer = load_tokenizer(params.model_path, params.model["trust_remote_code"])
    prompt_format = PromptFormat(tokenizer, params.model["prompt_format"])
    adapter = snakemake.input.get("adapter")
    model = load_for_generation(params.model_path, params.quantization, device, adapter,
                                params.model["trust_remote_code"])
    no_repeat = params.generation["no_repeat_ngram_size"]
    samples = generate_samples(model, prompt_format, params.prompts,
                               params.generation["max_new_tokens"], device, no_repeat)
    result = {
        "model": params.model_name,
        "quantization": params.quantization,
        "adapter": bool(adapter),
        "random_init": bool(model_info(params.model_path).get("random_init")),
        "prompt_format": prompt_format.describe(),
        "decoding": "greedy" + (f", no repeated {no_repeat}-grams" if no_repeat else ""),
        "samples": samples,
    }
    with open(snakemake.output[0], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    if snakemake.input.get("before"):  # "after" samples of a tracked run: into its tracker run
        with open(snakemake.input.before, encoding="utf-8") as f:
            before = json.load(f)
        reopen_trackers(params.tracking, snakemake.input.tracking).samples(before, result)


if __name__ == "__main__":
    main(snakemake)  # noqa: F821  (injected by Snakemake's script directive)
