"""The entry of Snakemake's jobs that run scripts/collect_metrics.py (started warm: see warm_start.py)."""
from warm_start import run_job

run_job("collect_metrics", snakemake)  # noqa: F821  (injected by Snakemake's script directive)
