#!/usr/bin/env bash
# Wheels a GPU machine without internet needs for bench/speed.py and bench/profile_step.py (its
# Python has torch and transformers but not bitsandbytes or liger-kernel), for CPython 3.12 on
# x86-64 Linux, into .device/wheels (git-ignored), with the versions of requirements.txt.
#
#   bash bench/fetch_wheels.sh            # then, there: pip install --no-deps .device/wheels/*.whl
#
# bench/seed_random_gpu.sh (the whole DAG) also needs snakemake and its dependencies there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
for package in bitsandbytes liger-kernel; do
    pin=$(grep -i "^${package}==" requirements.txt)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .device/wheels "$pin"
done
ls .device/wheels
