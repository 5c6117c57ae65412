"""What the dry run catches about models before any job runs (experiment_config.check_models):
a model directory without tokenizer files, an unknown init.architecture, a Jinja prompt_format
that fails, prompts longer than a local model's context, LoRA on tied embeddings. Each is one
line naming the key; `snakemake -n` shows it without a traceback."""

import shutil

import pytest
import yaml

from chat_styles import template
from conftest import REPO, copy_workflow, run_snakemake
from experiment_config import ConfigError, check_models, resolve_config

LONG_PROMPT = "Tell me a long story about a little girl named Lily and her big red ball. " * 30


def default_config():
    return yaml.safe_load((REPO / "config.yaml").read_text())


def check(config):
    check_models(resolve_config(config, "exp.yaml"), "exp.yaml")


def use_stories(config, stories, **model):
    """v1 and v2 train the real stories260k (a local directory) instead of tiny-qwen3."""
    config["models"]["stories"] = {"path": str(stories), **model}
    config["variants"]["v1"]["model"] = "stories"


@pytest.fixture
def stories(shared_fixtures):
    return shared_fixtures / "stories260k"


# stories260k without its tokenizer: transformers then builds an empty one from
# tokenizer_config.json (3 tokens; generation fails with an IndexError).
WITHOUT_TOKENIZER = ("config.json", "model.safetensors", "tokenizer_config.json")


@pytest.fixture
def untokenized_model(tmp_path, stories):
    directory = tmp_path / "untokenized"
    directory.mkdir()
    for name in WITHOUT_TOKENIZER:
        shutil.copy(stories / name, directory / name)
    return directory


def test_a_model_directory_without_tokenizer_files(untokenized_model):
    config = default_config()
    config["models"]["tiny-qwen3"] = {"path": str(untokenized_model)}
    with pytest.raises(ConfigError, match=rf"^exp.yaml: models.tiny-qwen3.path: {untokenized_model} has no "
                                          r"tokenizer files \(tokenizer.json, \*.model, vocab.json"):
        check(config)


def test_an_unknown_architecture_is_one_line_with_the_known_ones():
    config = default_config()
    config["models"]["tiny-qwen3"]["init"]["architecture"] = "qwen4"
    with pytest.raises(ConfigError) as error:
        check(config)
    message = str(error.value)
    assert message.startswith("exp.yaml: models.tiny-qwen3.init.architecture: 'qwen4' is not a "
                              "causal-LM architecture of transformers ")
    assert "(did you mean qwen3?); known: " in message
    known = message.split("; known: ")[1].split(", ")
    assert {"llama", "qwen3", "mistral", "gemma", "phi3"} <= set(known) and "t5" not in known
    assert "\n" not in message and len(message) < 4000  # transformers' own message: 12 KB


def test_an_init_transformers_cannot_build_names_the_key():
    config = default_config()
    config["models"]["tiny-qwen3"]["init"]["architecture"] = "t5"  # known, but no causal LM
    with pytest.raises(ConfigError, match="models.tiny-qwen3.init.architecture: 't5' is not a causal-LM"):
        check(config)


def test_a_jinja_prompt_format_that_fails_is_caught():
    config = default_config()
    config["models"]["tiny-llama"]["prompt_format"] = "{% for m in messages %}{{ m['content'] }}"
    with pytest.raises(ConfigError, match=r"models.tiny-llama.prompt_format: read as a Jinja chat "
                                          r"template, it fails: TemplateSyntaxError: .*endfor"):
        check(config)
    config["models"]["tiny-llama"]["prompt_format"] = template("chatml", tagged=True)
    check(config)  # {% generation %} is no error


def test_prompts_longer_than_a_local_models_context(stories):
    """stories260k's context is 512 tokens; prompts are counted in its prompt format."""
    config = default_config()
    use_stories(config, stories)
    check(config)  # the default's prompts fit
    config["prompts"].append(LONG_PROMPT)
    index, new_tokens = len(config["prompts"]) - 1, config["generation"]["max_new_tokens"]
    with pytest.raises(ConfigError, match=rf"^exp.yaml: prompts\[{index}\]: \d+ tokens in model stories's "
                                          rf"prompt format, plus generation.max_new_tokens {new_tokens}, is "
                                          r"more than its context of 512 tokens \(max_position_embeddings\)"):
        check(config)


def test_a_prompt_that_fits_only_without_the_new_tokens(stories):
    from chat_format import PromptFormat
    from modeling import load_tokenizer

    config = default_config()
    use_stories(config, stories)
    tokenizer = load_tokenizer(stories)
    prompt = LONG_PROMPT[: len(LONG_PROMPT) // 3]
    tokens = len(tokenizer(PromptFormat(tokenizer).generation_prompt(prompt), add_special_tokens=False)["input_ids"])
    assert tokens < 512
    config["prompts"] = [prompt]
    config["generation"]["max_new_tokens"] = 512 - tokens
    check(config)
    config["generation"]["max_new_tokens"] = 512 - tokens + 1
    with pytest.raises(ConfigError, match=rf"prompts\[0\]: {tokens} tokens in model stories's"):
        check(config)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens"])
def test_lora_on_tied_embeddings_says_the_whole_matrix_is_saved(target):
    config = default_config()
    config["models"]["tiny-qwen3"]["init"]["tie_word_embeddings"] = True
    config["lora"]["target_modules"].append(target)
    with pytest.raises(ConfigError) as error:
        check(config)
    assert str(error.value) == (
        f"exp.yaml: variants.v1.lora.target_modules: {target}: model tiny-qwen3 ties lm_head to "
        "embed_tokens (tie_word_embeddings), so peft saves the whole embedding matrix with the "
        "adapter, 2,048 x 64 = 131,072 parameters (0.26 MB in bf16), and merging the adapter "
        "changes the input embeddings too; leave lm_head and embed_tokens out of target_modules"
    )
    # The same LoRA on an untied model is fine.
    config["models"]["tiny-qwen3"]["init"]["tie_word_embeddings"] = False
    check(config)


def test_tied_embeddings_of_real_models_are_known_offline(stories):
    config = default_config()
    config["lora"]["target_modules"].append("lm_head")
    config["models"] = {"qwen3-4b": {"path": "Qwen/Qwen3-4B"}, "llama-2-7b": {"path": "meta-llama/Llama-2-7b-hf"}}
    config["variants"] = {"v1": {"model": "llama-2-7b"}, "v2": {"model": "qwen3-4b"}}
    config["comparisons"] = []
    with pytest.raises(ConfigError, match=r"^exp.yaml: variants.v2.lora.target_modules: lm_head: model qwen3-4b "
                                          r".*151,936 x 2,560 = 388,956,160 parameters \(778 MB in bf16\)"):
        check(config)
    config = default_config()
    config["lora"]["target_modules"].append("lm_head")
    use_stories(config, stories)
    with pytest.raises(ConfigError, match=r"model stories ties .* 512 x 64 = 32,768 parameters"):
        check(config)


@pytest.fixture(scope="module")
def workflow_copy(tmp_path_factory):
    return copy_workflow(tmp_path_factory.mktemp("dry_run_checks"))


@pytest.mark.parametrize("mistake", ["tokenizer", "architecture", "prompt", "tied"])
def test_the_dry_run_stops_with_one_line(workflow_copy, shared_fixtures, mistake):
    config = default_config()
    if mistake == "tokenizer":
        (workflow_copy / "untokenized").mkdir(exist_ok=True)
        for name in WITHOUT_TOKENIZER:
            shutil.copy(shared_fixtures / "stories260k" / name, workflow_copy / "untokenized" / name)
        config["models"]["tiny-qwen3"] = {"path": "./untokenized"}
        expected = "models.tiny-qwen3.path: ./untokenized has no tokenizer files"
    elif mistake == "architecture":
        config["models"]["tiny-qwen3"]["init"]["architecture"] = "qwen4"
        expected = "models.tiny-qwen3.init.architecture: 'qwen4' is not a causal-LM architecture"
    elif mistake == "prompt":
        use_stories(config, shared_fixtures / "stories260k")
        config["prompts"] = [LONG_PROMPT]
        expected = "prompts[0]: "
    else:
        config["models"]["tiny-qwen3"]["init"]["tie_word_embeddings"] = True
        config["lora"]["target_modules"].append("lm_head")
        expected = "variants.v1.lora.target_modules: lm_head: model tiny-qwen3 ties lm_head"
    (workflow_copy / f"{mistake}.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake(workflow_copy, "-n", "--configfile", f"{mistake}.yaml", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and f"{mistake}.yaml: {expected}" in output, output
    assert "Traceback" not in output and len(output.strip().splitlines()) < 8, output


def test_the_size_bound_never_lets_a_long_prompt_through(tmp_path, stories, bpe_model_dir):
    """The dry run loads a tokenizer only when sizes say a prompt may not fit: that bound must
    be at least the real count, for the seed format, a tokenizer's template and a config's one,
    also where every character is several bytes (sentencepiece's byte fallback)."""
    from chat_format import PromptFormat
    from experiment_config import prompts_may_overflow
    from modeling import load_tokenizer

    prompts = [*default_config()["prompts"], LONG_PROMPT, "日本語で説明してください。" * 5, "🙂 ok? " * 20, "x"]
    models = [
        {"path": str(stories), "prompt_format": "chat_template"},
        {"path": str(stories), "prompt_format": template("llama3")},
        {"path": str(bpe_model_dir), "prompt_format": "chat_template"},
        {"path": str(bpe_model_dir), "prompt_format": "seed"},
    ]
    for model in models:
        tokenizer = load_tokenizer(model["path"])
        prompt_format = PromptFormat(tokenizer, model["prompt_format"])
        for prompt in prompts:
            tokens = len(tokenizer(prompt_format.generation_prompt(prompt), add_special_tokens=False)["input_ids"])
            assert prompts_may_overflow(model, [prompt], tokens - 1), (model, prompt)


@pytest.fixture
def bpe_model_dir(tmp_path):
    """A tokenizer directory with a Qwen3-style template (saved as transformers saves it)."""
    from bundled_sample import make_conversations
    from chat_styles import style_tokenizer, train_byte_level_bpe

    rows = make_conversations(n=40, seed=3)
    bpe = train_byte_level_bpe([m["content"] for row in rows for m in row["messages"]])
    style_tokenizer(bpe, "qwen3").save_pretrained(tmp_path / "qwen3-style")
    return tmp_path / "qwen3-style"
