"""The lab notes (scripts/render_report.py + report/report.md.j2), rendered from a run's files
laid out as the workflow writes them, and read back with a markdown parser."""

import json
from pathlib import Path

import pandas as pd
import pytest

import collect_metrics
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


def experiment():
    return resolve_config({
        "dataset": {"source": "bundled", "num_train": 20, "num_eval": 5},
        "prompts": PROMPTS,
        "training": {"steps": 12},
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


def render(workdir, random_init=(True, False), completions=("plain answer", NASTY), skipped=None,
           drop=()):
    """Lay out a finished run's files in workdir/results, render the report, return its text.

    drop: metrics.json keys left out, as in files written by an older train.py.
    """
    config = experiment()
    results = workdir / "results"
    variants = list(config["variants"].values())
    metrics = []
    for i, v in enumerate(variants):
        written = fake_metrics(i, random_init=random_init[i])
        for key in drop:
            del written[key]
        metrics.append(write_json(results / "variants" / v["name"] / "metrics.json", written))
    metrics_csv = results / "metrics.csv"
    collect_metrics.collect(variants, metrics).to_csv(metrics_csv, index=False)
    tokens = {"prompt_format": "tokenizer chat template", "max_length": 256,
              "train": {"conversations": 20, "truncated": 3}, "eval": {"conversations": 5}}
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
            "data_stats": write_json(results / "data" / "stats.json", {
                "rows": 30, "usable": 25, "train": 20, "eval": 5, "skipped": skipped or {}}),
            "token_stats": [write_json(results / "tokenized" / "tiny-L256" / "stats.json", tokens)] * 2,
            "before": [write_json(results / "samples" / "before" / f"tiny__{v['quantization']}.json",
                                  samples([f"before {v['name']}: {c}" for c in completions]))
                       for v in variants],
            "after": [write_json(results / "variants" / v["name"] / "samples_after.json",
                                 samples([f"after {v['name']}: {c}" for c in completions]))
                      for v in variants],
            "plots": [str(path) for path in plots.values()],
        },
        output={"report": str(report)},
        params={"config": config, "plot_titles": list(plots)},
    ))
    return report.read_text(encoding="utf-8")


def test_stats_table_has_a_row_per_variant_with_the_csv_numbers(tmp_path):
    report = render(tmp_path)
    assert_stats_table_matches(report, pd.read_csv(tmp_path / "results" / "metrics.csv"))


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
    assert len(tables(report)) == 1
    headings = [tokens[i + 1].content for i, t in enumerate(tokens) if t.type == "heading_open"]
    assert headings == [
        "Lab notes: LoRA fine-tuning variants", "Stats", "Loss curves",
        "v1: nf4 baseline", "Samples (greedy, before → after fine-tuning)",
        "v2: no quantization", "Samples (greedy, before → after fine-tuning)",
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
    assert "Base model `tiny` (random-init), quantization nf4" in v1
    assert "12 steps" in v1 and "LoRA r=2" in v1
    v2 = section(report, "v2: no quantization")
    assert "From v1, changed:\n- `quantization`: nf4 → none\n" in v2


def test_mfu_is_shown_as_a_percentage_and_as_a_dash_when_null(tmp_path):
    report = render(tmp_path)
    v1, v2 = fake_metrics(0), fake_metrics(1)
    assert v1["mfu"] is None and v2["mfu"] is not None
    assert [row["MFU"] for row in stats_table(report)] == ["—", f"{100 * v2['mfu']:.1f}%"]
    assert "MFU" not in section(report, "v1: nf4 baseline")
    assert f"tokens/s (MFU {100 * v2['mfu']:.1f}%) on cpu" in section(report, "v2: no quantization")
    assert ("- Speed options: torch.compile off, fused loss off, Liger layer kernels off, packed "
            "batches, gradient checkpointing on 0 of 4 layers\n") in section(report, "v1: nf4 baseline")
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
    assert_stats_table_matches(report, pd.read_csv(tmp_path / "results" / "metrics.csv"))
    for heading in ("v1: nf4 baseline", "v2: no quantization"):
        bullets = section(report, heading)
        assert "tokens/s on cpu; peak memory" in bullets
        assert "MFU" not in bullets and "checkpointing" not in bullets and "Speed options" not in bullets


def test_skipped_rows_are_reported(tmp_path):
    assert "Skipped" not in render(tmp_path / "clean")
    report = render(tmp_path / "dirty", skipped={"invalid JSON": 4, "no assistant turn": 1})
    assert "Skipped while reading 30 rows: 4 × invalid JSON; 1 × no assistant turn." in report
