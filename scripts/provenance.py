"""Which code, packages, config and hardware produced a run's numbers: recorded in every run's
metrics.json, shown in the report's Provenance section, which flags runs that differ.

The command and the config files come from the environment the Snakefile sets
(LORANOTES_COMMAND, LORANOTES_CONFIG_FILES): job processes inherit it, and a param would rerun
every job whenever the command line changed.
"""

import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# The workflow's own directory (this file is scripts/provenance.py in it).
WORKFLOW_DIR = Path(__file__).resolve().parents[1]
PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "liger-kernel", "accelerate",
            "datasets", "tokenizers", "snakemake"]
# What makes the code: a checkout without git (a copied workflow) is identified by these files.
CODE_FILES = ["Snakefile", "rules/*.smk", "scripts/*.py", "schemas/*.yaml", "report/*.j2"]


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def code_sha256(root=WORKFLOW_DIR):
    """One hash of the workflow's code files (names and contents)."""
    digest = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(root.glob(pattern)):
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_state(root=WORKFLOW_DIR):
    """(commit, dirty) of the workflow's git checkout; (None, None) when it is none."""
    if shutil.which("git") is None:
        return None, None
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=30)
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None, None
    # untracked files count too (a new module changes the code), ignored ones (results/) not
    status = git("status", "--porcelain")
    return head.stdout.strip(), bool(status.stdout.strip())


def package_versions():
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def config_files():
    """[{path, sha256}] of the config files of the snakemake invocation."""
    files = []
    for path in json.loads(os.environ.get("LORANOTES_CONFIG_FILES", "[]")):
        files.append({"path": path, "sha256": sha256_file(path) if Path(path).is_file() else None})
    return files


def hardware(device):
    """The device a run used: its name, and CUDA's and the driver's versions on a GPU."""
    import torch

    if device.type != "cuda":
        return {"device": platform.processor() or platform.machine(), "cuda": None, "driver": None}
    driver = None
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        driver = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    return {"device": torch.cuda.get_device_name(device), "cuda": torch.version.cuda, "driver": driver}


def run_provenance(device, settings, started):
    """The provenance record of one run: `settings` are its resolved model, quantization,
    training and lora settings; `started` the time it started (UTC)."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "code_sha256": code_sha256(),
        "config_files": config_files(),
        "settings": settings,
        "packages": package_versions(),
        **hardware(device),
        "host": platform.node(),
        "started_utc": started.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": os.environ.get("LORANOTES_COMMAND") or " ".join(sys.argv),
    }
