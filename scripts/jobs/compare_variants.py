"""The entry of Snakemake's jobs that run scripts/compare_variants.py (started warm: see warm_start.py)."""
from warm_start import run_job

run_job("compare_variants", snakemake)  # noqa: F821  (injected by Snakemake's script directive)
