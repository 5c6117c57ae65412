"""The entry of Snakemake's jobs that run scripts/prepare_data.py (started warm: see warm_start.py)."""
from warm_start import run_job

run_job("prepare_data", snakemake)  # noqa: F821  (injected by Snakemake's script directive)
