"""The lab notes (scripts/render_report.py + report/report.md.j2), rendered from a run's files
laid out as the workflow writes them, and read back with a markdown parser."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

import collect_metrics
import compare_variants
import render_report
from conftest import REPO
from util import (
    PNG_MAGIC,
    assert_stats_table_matches,
    fake_metrics,
    fake_snakemake,
    fence_contents,
    images,
    parse_markdown,
    stats_table,
    tables,
)
from experiment_config import resolve_config

# Model output that would break naive markdown: fences of 3 and 4 backticks, HTML, table pipes.
NASTY = (
    "Sure! Here is code:\n```python\nprint('```')\n```\nand a longer fence:\n"
    "````md\n| a | b |\n|---|---|\n````\n<script>alert('x')</script>\n"
    "| pipes | in | text |\n~~~\nan unclosed tilde fence"
)
PROMPTS = ["What does `|` do in ```bash```?", "Say hi."]


def experiment(seeds=(0, 1, 2)):
    return resolve_config({
        "dataset": {"source": "bundled", "num_train": 20, "num_eval": 5},
        "prompts": PROMPTS,
        "training": {"steps": 12, "seeds": list(seeds)},
        "lora": {"r": 2},
        "models": {"tiny": {"init": {"architecture": "qwen3"}}},
        "variants": {
            "v1": {"title": "nf4 baseline", "description": "The base.", "model": "tiny",
                   "quantization": "nf4"},
            "v2": {"from": "v1", "title": "no quantization", "quantization": "none"},
        },
        "comparisons": [{"name": "img1_loss_v2_vs_v1", "variants": ["v2", "v1"]}],
    }, "exp.yaml")


def samples(completions, **info):
    return {"decoding": "greedy", **info,
            "samples": [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, completions)]}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


DATA_STATS = {
    "source": {"kind": "bundled", "path": "results/data/bundled_sample.jsonl",
               "files": [{"path": "results/data/bundled_sample.jsonl", "sha256": "ab" * 32, "rows": 30}]},
    "rows": 30, "usable": 25, "skipped": {}, "skipped_examples": {},
    "train": 20, "eval": 5, "requested_train": 20, "requested_eval": 5,
}
TOKEN_STATS = {
    "prompt_format": "tokenizer chat template", "turn_end": "<|im_end|>", "max_length": 256,
    "train": {"conversations_in": 20, "kept_whole": 15, "shortened": 3, "dropped": 2,
              "conversations": 18, "tokens": 4000, "assistant_tokens": 2500},
    "eval": {"conversations_in": 5, "kept_whole": 5, "shortened": 0, "dropped": 0,
             "conversations": 5, "tokens": 900, "assistant_tokens": 400},
}


def render(workdir, random_init=(True, False), completions=("plain answer", NASTY), skipped=None,
           drop=(), seeds=(0, 1, 2), metrics_of=fake_metrics):
    """Lay out a finished run's files in workdir/results, make its metrics, summary and
    comparisons CSVs with the pipeline's own functions, render the report, return its text.

    drop: metrics.json keys left out, as in files written by an older train.py.
    """
    config = experiment(seeds)
    results = workdir / "results"
    variants = list(config["variants"].values())
    runs, metrics = [], []
    for i, v in enumerate(variants):
        for seed in v["seeds"]:
            written = metrics_of(i, seed, random_init=random_init[i])
            for key in drop:
                del written[key]
            runs.append({"variant": v, "seed": seed})
            metrics.append(write_json(results / "variants" / v["name"] / f"seed-{seed}" / "metrics.json", written))
    metrics_csv, summary_csv, comparisons_csv = (results / f"{n}.csv" for n in ("metrics", "summary", "comparisons"))
    collect_metrics.collect(runs, metrics).to_csv(metrics_csv, index=False)
    frame = pd.read_csv(metrics_csv)
    compare_variants.summarize(frame, list(config["variants"])).to_csv(summary_csv, index=False)
    pairs = compare_variants.comparison_pairs(list(config["variants"]), config["comparisons"],
                                              {n: v["parent"] for n, v in config["variants"].items()})
    compare_variants.compare_runs(frame, pairs).to_csv(comparisons_csv, index=False)
    plots = {"All variants": results / "plots" / "all_variants.png",
             "v2 vs v1": results / "plots" / "img1_loss_v2_vs_v1.png"}
    for path in plots.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(PNG_MAGIC)
    report = results / "report.md"
    render_report.main(fake_snakemake(
        input={
            "template": str(REPO / "report" / "report.md.j2"),
            "metrics": str(metrics_csv),
            "summary": str(summary_csv),
            "comparisons": str(comparisons_csv),
            "data_stats": write_json(results / "data" / "stats.json", {
                **DATA_STATS, "skipped": skipped or {}}),
            "token_stats": [write_json(results / "tokenized" / "tiny-L256" / "stats.json", TOKEN_STATS)] * 2,
            "before": [write_json(results / "samples" / "before" / f"tiny__{v['quantization']}.json",
                                  samples([f"before {v['name']}: {c}" for c in completions]))
                       for v in variants],
            "after": [write_json(results / "variants" / v["name"] / "seed-0" / "samples_after.json",
                                 samples([f"after {v['name']}: {c}" for c in completions]))
                      for v in variants],
            "plots": [str(path) for path in plots.values()],
        },
        output={"report": str(report)},
        params={"config": config, "plot_titles": list(plots)},
        log={"log": str(workdir / "report.log")},
    ))
    return report.read_text(encoding="utf-8")


def csv(workdir, name):
    return pd.read_csv(workdir / "results" / f"{name}.csv")


def test_stats_table_has_a_row_per_variant_with_the_csv_numbers(tmp_path):
    for seeds in ((0, 1, 2), (0,)):
        workdir = tmp_path / str(len(seeds))
        report = render(workdir, seeds=seeds)
        assert_stats_table_matches(report, csv(workdir, "summary"), csv(workdir, "metrics"))


def test_generated_text_stays_inside_its_fence(tmp_path):
    report = render(tmp_path)
    fences = fence_contents(report)
    for prompt in PROMPTS:
        assert fences.count(prompt + "\n") == 2  # shown in each variant's section
    for name in ("v1", "v2"):
        for when in ("before", "after"):
            for completion in ("plain answer", NASTY):
                assert f"{when} {name}: {completion}\n" in fences
    # Nothing of the generations leaks into the document's structure: no live HTML, no extra
    # tables, every heading after the samples still a heading.
    tokens = parse_markdown(report)
    assert not [t for t in tokens if t.type.startswith("html")]
    assert not [c for t in tokens for c in t.children or [] if c.type.startswith("html")]
    assert len(tables(report)) == 3  # the stats table and each variant's seeds
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [
        "Lab notes: LoRA fine-tuning variants", "Conclusions", "Stats", "Curves",
        "v1: nf4 baseline", "Samples (greedy, before → after fine-tuning, seed 0)",
        "v2: no quantization", "Samples (greedy, before → after fine-tuning, seed 0)",
        "Provenance",
    ]


@pytest.mark.parametrize("random_init", [(True, False), (False, True), (False, False)])
def test_random_init_is_marked_exactly_where_it_is_true(tmp_path, random_init):
    report = render(tmp_path, random_init=random_init)
    rows = stats_table(report)
    for row, flag in zip(rows, random_init):
        assert row["Model"] == ("tiny (random-init)" if flag else "tiny")
    assert ("Random weights" in report) == any(random_init)
    # its own list item, not glued to the line before
    marker = "- *random-init model: loss and samples are not meaningful*"
    assert report.splitlines().count(marker) == sum(random_init)
    if not any(random_init):
        assert "random" not in report.lower()


def test_plots_are_linked_relative_to_the_report(tmp_path):
    report = render(tmp_path)
    linked = images(report)
    assert [alt for alt, _ in linked] == ["All variants", "v2 vs v1"]
    for _, src in linked:
        assert not Path(src).is_absolute()
        assert (tmp_path / "results" / src).read_bytes().startswith(PNG_MAGIC)


def section(report, heading):
    """The text of a level-2 section, up to the next one."""
    return report.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_variant_sections_describe_the_setup_and_what_changed(tmp_path):
    report = render(tmp_path)
    v1 = section(report, "v1: nf4 baseline")
    assert "The base." in v1
    assert "Base model `tiny`, quantization nf4" in v1
    assert "- Base model `tiny`: random weights (capacity planning)\n" in v1
    assert "12 steps" in v1 and "LoRA r=2" in v1
    v2 = section(report, "v2: no quantization")
    assert "From v1, changed:\n- `quantization`: nf4 → none\n" in v2


def test_mfu_is_shown_as_a_percentage_and_as_a_dash_when_null(tmp_path):
    report = render(tmp_path)
    v1, v2 = fake_metrics(0), fake_metrics(1)
    assert v1["mfu"] is None and v2["mfu"] is not None
    # v2's three seeds measured the same MFU: no spread, shown to the fallback 0.1 percent
    assert [row["MFU"] for row in stats_table(report)] == ["—", f"{100 * v2['mfu']:.1f} ± 0.0%"]
    assert ("- Speed options: torch.compile off, fused loss off (logits at the labelled positions "
            "only), Liger layer kernels off, packed batches, gradient checkpointing on 0 of 4 "
            "layers\n") in section(report, "v1: nf4 baseline")
    assert ("- Speed options: torch.compile on, fused loss on, Liger layer kernels off, packed "
            "batches, gradient checkpointing on 1 of 4 layers, 35% of the compiled layers' activations "
            "kept (the rest recomputed in backward)\n") in section(report, "v2: no quantization")


def test_metrics_without_mfu_keys_still_render(tmp_path):
    """metrics.json written before train.py measured MFU: the table shows '—', the sections
    leave MFU and gradient checkpointing out."""
    new_keys = ["mfu", "bf16_matmul_tflops", "flops_per_token", "gradient_checkpointing_layers",
                "decoder_layers", "activations_kept", "compiled", "fused_loss", "fused_kernels",
                "varlen_attention"]
    report = render(tmp_path, drop=new_keys)
    assert [row["MFU"] for row in stats_table(report)] == ["—", "—"]
    assert_stats_table_matches(report, csv(tmp_path, "summary"), csv(tmp_path, "metrics"))
    for heading in ("v1: nf4 baseline", "v2: no quantization"):
        bullets = section(report, heading)
        assert "parameters; on cpu" in bullets
        assert "checkpointing" not in bullets and "Speed options" not in bullets


def test_skipped_rows_are_reported(tmp_path):
    assert "skipped" not in render(tmp_path / "clean")
    report = render(tmp_path / "dirty", skipped={"invalid JSON": 4, "no assistant turn": 1})
    assert "30 rows, 25 usable; skipped 4 × invalid JSON; 1 × no assistant turn." in report


def test_conclusions_give_each_comparison_its_verdict_and_interval(tmp_path):
    report = render(tmp_path)
    comparisons = csv(tmp_path, "comparisons")
    conclusions = section(report, "Conclusions")
    assert len(comparisons) == 2  # eval loss and held-out accuracy of v2 against v1 (asked twice)
    for line in comparisons["verdict"]:
        assert f"  {line}.\n" in conclusions
    assert "**v2 vs v1** (img1_loss_v2_vs_v1, v2 from v1)" in conclusions
    assert "paired t-test over seeds 0, 1, 2" in conclusions


def test_one_seed_says_there_is_no_noise_estimate(tmp_path):
    report = render(tmp_path, seeds=(0,))
    assert "no confidence interval with 1 seed each" in section(report, "Conclusions")
    assert "With one seed there is no spread" in section(report, "Stats")
    assert all(" ± " not in row["Train loss"] for row in stats_table(report))
    # printed to the run's own standard error (0.01: 3 decimals), not to a fixed 4
    assert [row["Train loss"] for row in stats_table(report)] == ["2.500", "2.357"]
    assert "With one seed" not in section(render(tmp_path / "three"), "Stats")


def blank_and_control(index, seed, **overrides):
    return fake_metrics(index, seed, **overrides)


@pytest.mark.parametrize("completion, shown", [
    ("", "[empty generation]"),
    ("\n" * 48, "[blank generation: 48 newlines]"),
    ("  \n\t", "[blank generation: 2 spaces, 1 newline, 1 tab]"),
    ("bell\x07 and escape\x1b[31mred", "bell\\x07 and escape\\x1b[31mred"),
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("top" + "\n" * 300 + "bottom", "top\n[… 299 blank lines …]\nbottom"),
    ("a\n\nb", "a\n\nb"),
])
def test_generations_read_well_whatever_the_model_wrote(tmp_path, completion, shown):
    report = render(tmp_path, completions=(completion, "fine"))
    assert f"before v1: {completion}" not in fence_contents(report) or completion == "a\n\nb"
    if completion.strip():
        assert any(content == f"after v1: {shown}\n" for content in fence_contents(report)), shown
    else:  # the whole generation is the "before v1: " prefix plus blanks: test the function
        assert render_report.shown_sample(completion) == shown
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", report)  # no raw control characters
    assert max(len(run) for run in re.findall(r"\n+", report)) <= 3  # no long runs of blank lines


def test_long_generations_are_cut_with_a_pointer_to_the_whole_text():
    shown = render_report.shown_sample("\n".join(f"line {i}" for i in range(100)))
    lines = shown.splitlines()
    assert len(lines) == render_report.SAMPLE_MAX_LINES + 1
    assert lines[-1] == f"[… {100 - render_report.SAMPLE_MAX_LINES} more lines, see the samples JSON …]"


def test_provenance_names_code_packages_config_and_flags_runs_that_differ(tmp_path):
    same = section(render(tmp_path / "same"), "Provenance")
    assert "git commit `0123456789abcdef0123456789abcdef01234567`" in same
    assert "torch 2.13.0" in same and "Config: `/work/exp/config.yaml`, sha256 `cfcfcfcfcfcf`" in same
    assert "Command: `snakemake --cores 1 results/report.md`" in same
    assert "different code or packages" not in same

    def newer_torch_for_v2(index, seed, **overrides):
        metrics = fake_metrics(index, seed, **overrides)
        if index == 1:
            metrics["provenance"]["packages"]["torch"] = "2.14.0"
        return metrics
    differs = section(render(tmp_path / "differs", metrics_of=newer_torch_for_v2), "Provenance")
    assert "**Runs of different code or packages.**" in differs
    assert "torch 2.14.0, transformers 5.24.0 (runs: v2 seed 0, v2 seed 1, v2 seed 2)" in differs


@pytest.mark.parametrize("source, shown", [
    ({"kind": "file", "path": "/data/chats.jsonl", "files": [{}]}, "The file `/data/chats.jsonl`: 30 rows"),
    ({"kind": "directory", "path": "/data/shards", "files": [{}, {}, {}]},
     "The directory `/data/shards` (3 files): 30 rows"),
    ({"kind": "hub", "id": "HuggingFaceH4/ultrachat_200k", "split": "train_sft"},
     "The hub dataset `HuggingFaceH4/ultrachat_200k` (split `train_sft`): 30 rows"),
])
def test_the_data_line_names_what_was_read(tmp_path, source, shown, monkeypatch):
    monkeypatch.setitem(DATA_STATS, "source", source)
    report = render(tmp_path)
    assert shown in report
    assert "training on 18 of the 20 training conversations (15 whole, 3 shortened" in report
