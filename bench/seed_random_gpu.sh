#!/usr/bin/env bash
# The seed experiment (configs/seed.yaml) in capacity-planning mode on one GPU, offline:
# the whole Snakemake DAG, random weights of Qwen3-4B and Llama-2-7b, real UltraChat rows.
#
#   bash bench/seed_random_gpu.sh OUT_DIR
#
# Expects wheels for what the machine lacks (snakemake, bitsandbytes) in .device/wheels and an
# ultrachat_200k-format .jsonl at .device/ultrachat_sample.jsonl. GPU jobs are serialized
# (train takes the whole GPU, up to four generation jobs share it) so s/step is not disturbed.
# Resumable: run it again on the same machine and Snakemake continues where it stopped; only
# params and inputs trigger reruns, since a re-sent working tree has new mtimes.
set -euo pipefail
out=${1:?usage: seed_random_gpu.sh OUT_DIR}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c 'import bitsandbytes, snakemake.workflow' 2>/dev/null ||
    python3 -m pip install --quiet --no-deps --no-index .device/wheels/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, peft, bitsandbytes as b; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", b.__version__)' | tee -a "$out/gpu.txt"

status=0
timeout -s INT "${SNAKEMAKE_TIMEOUT:-100000}" python3 -m snakemake results/report.md \
    --configfile configs/seed.yaml bench/gpu-offline.yaml \
    --cores 16 --resources gpu=4 --scheduler greedy --rerun-incomplete \
    --rerun-triggers params input software-env \
    --set-resources build_model:gpu=4 train:gpu=4 generate_before:gpu=1 generate_after:gpu=1 \
    > "$out/snakemake.log" 2>&1 || status=$?
tail -n 15 "$out/snakemake.log"
tar czf "$out/results.tgz" --exclude='results/models' --exclude='*/adapter' results
exit $status
