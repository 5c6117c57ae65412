"""Models loranotes builds: pretraining on the bundled knowledge table (deterministic, plain text,
an ordinary Hugging Face directory afterwards), what the built model records about itself, and
the model-source facts the Snakefile decides with (model_sources)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from build_model import build_model, train_tokenizer
from bundled_sample import load_knowledge, make_conversations, select_topics
from chat_format import PromptFormat
from conftest import REPO
from model_sources import architecture_spec, is_built, model_info, weights_phrase
from pretrain import PRETRAIN_DEFAULTS, knowledge_documents, pretrain_settings, token_stream

TOPICS = ["LoRA", "recursion"]
TINY = {"architecture": "qwen3", "vocab_size": 512, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "tie_word_embeddings": True}
SETTINGS = {**PRETRAIN_DEFAULTS, "steps": 20, "batch_size": 2, "seq_length": 64, "copies": 1}


@pytest.fixture(scope="module")
def knowledge():
    knowledge = load_knowledge()
    return {**knowledge, "topics": select_topics(knowledge, TOPICS)}


@pytest.fixture(scope="module")
def texts():
    rows = make_conversations(n=40, seed=0, topics=TOPICS)
    return [message["content"] for row in rows for message in row["messages"]]


def build(knowledge, texts, out_dir, spec=TINY, **settings):
    settings = {**SETTINGS, **settings}
    documents = knowledge_documents(knowledge, settings["copies"], settings["seed"])
    return build_model(spec, texts + documents, out_dir,
                       pretraining={"settings": settings, "documents": documents})


@pytest.fixture(scope="module")
def built(knowledge, texts, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("built") / "tiny-qwen3"
    build(knowledge, texts, out_dir)
    return out_dir


def test_pretraining_gives_the_same_weights_twice(built, knowledge, texts, tmp_path):
    build(knowledge, texts, tmp_path / "again")
    first, second = load_file(built / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    build(knowledge, texts, tmp_path / "other-seed", seed=1)  # and the seed is what decides them
    other = load_file(tmp_path / "other-seed" / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_the_built_model_loads_and_generates_with_plain_transformers(built):
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is LoRA?"}],
                                           tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_pretraining_lowers_the_loss_on_its_text(built, knowledge, texts, tmp_path):
    random_weights = tmp_path / "random"
    build_model(TINY, texts + knowledge_documents(knowledge, 1, 0), random_weights)

    def loss(directory):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        stream, _ = token_stream(AutoTokenizer.from_pretrained(directory), knowledge_documents(knowledge, 1, 0))
        with torch.no_grad():
            return model(input_ids=stream[None, :256], labels=stream[None, :256]).loss.item()

    assert loss(built) < 0.8 * loss(random_weights)


def test_the_pretraining_text_holds_no_chat_format_and_no_end_of_turn(knowledge, texts):
    documents = knowledge_documents(knowledge, 2, 0)
    for chatml in (True, False):
        tokenizer = train_tokenizer(texts, 512, chatml=chatml)
        stream, separator = token_stream(tokenizer, documents)
        assert tokenizer.eos_token_id not in stream.tolist()
        assert separator in (tokenizer.bos_token_id, tokenizer.pad_token_id) != tokenizer.eos_token_id
    text = "\n".join(documents)
    for marker in ("<|im_start|>", "<|im_end|>", "### USER", "### Assistant", "</s>"):
        assert marker not in text
    for topic in knowledge["topics"]:
        assert topic["facts"][0] in text


def test_end_of_turn_starts_fine_tuning_as_an_ordinary_token(built):
    """Never a pretraining target, so not pushed below every token, and as long as the others."""
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    lengths = model.get_output_embeddings().weight[: len(tokenizer)].detach().norm(dim=1)
    trained = torch.ones(len(tokenizer), dtype=torch.bool)
    trained[[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_start|>")]] = False
    assert lengths[tokenizer.eos_token_id] == pytest.approx(lengths[trained].mean().item(), rel=1e-4)


def test_the_record_says_how_the_model_was_made(built):
    info = model_info(built)
    assert info["built_by"] == "loranotes" and info["weights"] == "pretrained" and info["random_init"] is False
    assert info["pretrain"]["steps"] == SETTINGS["steps"]
    assert info["pretrain"]["tokens"] == SETTINGS["steps"] * SETTINGS["batch_size"] * SETTINGS["seq_length"]
    assert weights_phrase(info) == (
        "pretrained by loranotes for 20 steps on the bundled knowledge table as plain text "
        f"({info['pretrain']['text_tokens']:,} tokens, 2,560 trained on; "
        f"final loss {info['pretrain']['final_loss']:.2f})")
    assert weights_phrase({}) is None  # a hub model: its weights are its own


def test_which_models_loranotes_builds():
    tiny = {"init": {"architecture": "llama", "hidden_size": 64, "pretrain": {"steps": 10}}}
    hub = {"path": "Qwen/Qwen3-4B"}
    assert is_built(tiny, "pretrained") and is_built(hub, "random") and not is_built(hub, "pretrained")
    assert architecture_spec(tiny, "pretrained") == {"architecture": "llama", "hidden_size": 64}
    assert pretrain_settings(tiny, "pretrained") == {**PRETRAIN_DEFAULTS, "steps": 10}
    # capacity planning plans with random weights: an init model is not pretrained then
    assert pretrain_settings(tiny, "random") is None
    assert pretrain_settings({"init": {"architecture": "llama"}}, "pretrained") is None


def test_a_tokenize_job_for_a_built_model_needs_no_torch(built):
    """The tokenize job imports modeling for load_tokenizer; torch would cost it 2-3 s."""
    code = ("import sys; sys.path.insert(0, 'scripts'); from modeling import load_tokenizer; "
            f"t = load_tokenizer({str(built)!r}); assert t.chat_template; "
            "print('torch' in sys.modules, 'transformers.modeling_utils' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_loading_a_built_tokenizer_matches_auto_tokenizer(built):
    from modeling import load_tokenizer

    ours, auto = load_tokenizer(built), AutoTokenizer.from_pretrained(built)
    text = "Hi! Can you explain LoRA in simple terms?"
    assert ours(text)["input_ids"] == auto(text)["input_ids"]
    messages = [{"role": "user", "content": text}, {"role": "assistant", "content": "Sure."}]
    assert PromptFormat(ours).render(messages) == PromptFormat(auto).render(messages)


def test_parsing_a_config_imports_no_model_code():
    """model_sources is read when the Snakefile is parsed: no torch, no build_model."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import experiment_config; "
            "print(sorted(m for m in ('torch', 'build_model', 'pretrain', 'modeling') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_build_model_main_records_the_rule_inputs(knowledge, tmp_path):
    """The Snakemake entry point: topics and pretraining settings from the rule's params."""
    from build_model import main
    from util import fake_snakemake

    conversations = tmp_path / "sample.jsonl"
    conversations.write_text("".join(json.dumps(r) + "\n" for r in make_conversations(n=30, topics=TOPICS)))
    model = {"init": {**TINY, "pretrain": {"steps": 5, "batch_size": 2, "seq_length": 32, "copies": 1}},
             "prompt_format": "chat_template", "trust_remote_code": False}
    main(fake_snakemake(
        input={"conversations": str(conversations), "knowledge": str(REPO / "scripts/data/knowledge.yaml")},
        output={"model_dir": str(tmp_path / "model")}, log={"log": str(tmp_path / "build.log")},
        params={"model": model, "weights": "pretrained", "topics": TOPICS}))
    info = model_info(tmp_path / "model")
    # 1 copy of 2 topics' article, question page and 2 worded questions
    assert info["pretrain"]["steps"] == 5 and info["pretrain"]["documents"] == 8
