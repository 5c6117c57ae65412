"""What each job of the embedded default pays before it does any work: the imports of its script
(and the libraries it loads lazily on the way), each measured in a fresh process, plus
Snakemake's own start-up and its cost per `script:` job.

    python bench/startup.py OUT.json [--repeats 3]

It also times a job's entry (scripts/jobs/warm_start.run_job) whose work is the train job's
imports, started cold and started warm (a warm process already up).

Each number is the median of `repeats` fresh processes, as wall seconds and as CPU seconds (user +
system of the child). On a machine shared with other work the CPU seconds are the steadier of the
two; compare rows of one run, not runs of different days.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_machine

REPO = Path(__file__).resolve().parents[1]

# What a job imports: its script, then what its work loads lazily (transformers' model code when
# a model is loaded, peft for LoRA, bitsandbytes for nf4, which peft also imports when present).
JOB_IMPORTS = {
    "bundled_sample, prepare_data": ["bundled_sample", "prepare_data"],
    "tokenize (a built model's tokenizer)": ["tokenize_data", "modeling", "transformers.PreTrainedTokenizerFast"],
    "tokenize (AutoTokenizer, a hub model's)": ["tokenize_data", "transformers.AutoTokenizer"],
    "build_model": ["build_model", "transformers.modeling_utils"],
    "generate_before, quantization none": ["generate", "transformers.modeling_utils"],
    "generate_before, nf4": ["generate", "transformers.modeling_utils", "bitsandbytes"],
    "generate_after / train (peft, bitsandbytes)": ["train", "generate", "transformers.modeling_utils", "peft"],
    "collect_metrics": ["collect_metrics"],
    "plot_comparison": ["plot_loss"],
    "report": ["render_report"],
}
# The building blocks, alone.
LIBRARIES = {
    "python, nothing imported": [],
    "torch": ["torch"],
    "transformers (package only)": ["transformers"],
    "transformers.modeling_utils (with torch)": ["transformers.modeling_utils"],
    "peft (with torch, transformers, bitsandbytes)": ["peft"],
    "bitsandbytes (with torch)": ["bitsandbytes"],
    "pandas": ["pandas"],
    "matplotlib.pyplot": ["matplotlib.pyplot"],
}


def import_statement(name):
    module, _, attribute = name.rpartition(".") if name.split(".")[-1][:1].isupper() else (name, "", "")
    return f"from {module} import {attribute}" if attribute else f"import {name}"


def child_seconds(command, cwd=REPO, env=None):
    """(wall, cpu) seconds of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def median_seconds(command, repeats, cwd=REPO, env=None):
    runs = [child_seconds(command, cwd, env) for _ in range(repeats)]
    return {"wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs)}


def imports(names, repeats):
    code = "import sys; sys.path.insert(0, 'scripts')\n" + "\n".join(map(import_statement, names))
    return median_seconds([sys.executable, "-c", code], repeats)


def snakemake_per_script_job(repeats, jobs=6):
    """A workflow of `jobs` independent `script:` jobs that import nothing: its run minus its
    dry run, per job (Python start-up, Snakemake's script preamble, the scheduler)."""
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "noop.py").write_text("open(snakemake.output[0], 'w').close()\n")
        (Path(workdir) / "Snakefile").write_text(
            f"rule all:\n    input: expand('out/{{i}}', i=range({jobs}))\n\n"
            "rule one:\n    output: 'out/{i}'\n    script: 'noop.py'\n")
        snakemake = [sys.executable, "-m", "snakemake", "--cores", "1", "--quiet"]
        dry = median_seconds([*snakemake, "-n"], repeats, cwd=workdir)
        runs = []
        for _ in range(repeats):
            subprocess.run([*snakemake, "--delete-all-output"], cwd=workdir, capture_output=True)
            runs.append(child_seconds(snakemake, cwd=workdir))
        run = {"wall_s": statistics.median(r[0] for r in runs), "cpu_s": statistics.median(r[1] for r in runs)}
        return {key: (run[key] - dry[key]) / jobs for key in run}, dry


def job_entry(repeats):
    """A train job's start through its entry, cold and then warm: wall seconds of the entry
    process (a warm job's CPU seconds are spent in the warm process, not counted here)."""
    sys.path.insert(0, str(REPO / "scripts" / "jobs"))
    import warm_start

    heavy = ["train", "transformers.modeling_utils", "peft"]
    with tempfile.TemporaryDirectory(prefix="lw", dir="/tmp") as workdir:  # its own warm process
        (Path(workdir) / "imports_job.py").write_text(
            "def main(snakemake):\n" + "".join(f"    {import_statement(n)}\n" for n in heavy))
        code = (f"import sys; sys.path[:0] = ['scripts/jobs', 'scripts', {workdir!r}]\n"
                "from warm_start import run_job; run_job('imports_job', None)")
        command = [sys.executable, "-c", code]
        env = {**os.environ, "TMPDIR": workdir}
        env.pop("LORANOTES_WARM_START", None)
        cold = median_seconds(command, repeats, env={**env, "LORANOTES_WARM_START": "0"})
        subprocess.run(command, cwd=REPO, env=env, check=True)  # cold, and starts a warm process
        paths = warm_start.server_paths(Path(workdir) / f"loranotes-warm-{os.getuid()}", warm_start.server_key(env))
        assert warm_start.wait_until_warm(paths), "the warm process did not start"
        warm = median_seconds(command, repeats, env=env)
        os.kill(int(paths["lock"].read_text()), signal.SIGTERM)
    return {"cold": {"wall_s": cold["wall_s"]}, "warm": {"wall_s": warm["wall_s"]}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {"machine": cpu_machine(threads=1),
              "repeats": args.repeats, "libraries": {}, "jobs": {}}
    for label, names in LIBRARIES.items():
        result["libraries"][label] = imports(names, args.repeats)
        print(f"{label:50s} {result['libraries'][label]['wall_s']:6.2f} s wall {result['libraries'][label]['cpu_s']:6.2f} s cpu", flush=True)
    for label, names in JOB_IMPORTS.items():
        result["jobs"][label] = imports(names, args.repeats)
        print(f"{label:50s} {result['jobs'][label]['wall_s']:6.2f} s wall {result['jobs'][label]['cpu_s']:6.2f} s cpu", flush=True)
    per_job, dry = snakemake_per_script_job(args.repeats)
    result["snakemake"] = {"dry_run_of_a_tiny_workflow": dry, "per_script_job": per_job}
    print(f"{'snakemake: per script job':50s} {per_job['wall_s']:6.2f} s wall {per_job['cpu_s']:6.2f} s cpu")
    print(f"{'snakemake: dry run of a 6-job workflow':50s} {dry['wall_s']:6.2f} s wall {dry['cpu_s']:6.2f} s cpu")
    result["train_job_start"] = job_entry(args.repeats)
    for start, seconds in result["train_job_start"].items():
        print(f"{'train job start through its entry, ' + start:50s} {seconds['wall_s']:6.2f} s wall")
    result["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
