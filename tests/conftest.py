"""Shared fixtures: the scripts on sys.path, a copy of the workflow, one full default run, and
the real third-party fixtures in ../shared/fixtures."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# Real third-party material (tiny trained Llama, real UltraChat rows); not part of the repo.
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"

WORKFLOW_FILES = ["Snakefile", "config.yaml", "requirements.txt"]
WORKFLOW_DIRS = ["rules", "scripts", "schemas", "report", "envs", "configs", "profiles"]
IGNORED = shutil.ignore_patterns("results", ".snakemake", "__pycache__", "*.pyc")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow (code and config, no results) into dest and return dest."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        shutil.copy2(REPO / name, dest / name)
    for name in WORKFLOW_DIRS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, dest / name, ignore=IGNORED, dirs_exist_ok=True)
    return dest


def run_snakemake(workdir, *args, check=True):
    """Run snakemake in workdir; with check, a failure shows snakemake's whole output."""
    command = [sys.executable, "-m", "snakemake", *args]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed in {workdir} (exit {result.returncode})\n"
            f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}",
            pytrace=False,
        )
    return result


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """The embedded default config run end to end (~70 s on 2 CPU cores); returns its dir."""
    workdir = copy_workflow(tmp_path_factory.mktemp("default_run"))
    run_snakemake(workdir, "--cores", "2", "results/report.md")
    return workdir


@pytest.fixture(scope="session")
def shared_fixtures():
    """../shared/fixtures: skipped on a developer's clone without it, an error in CI."""
    if not SHARED_FIXTURES.is_dir():
        message = f"real test fixtures not found at {SHARED_FIXTURES} (see its README.md)"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must provide them", pytrace=False)
        pytest.skip(message)
    return SHARED_FIXTURES
