#!/usr/bin/env bash
# Wheels a GPU machine without internet needs for bench/speed.py and bench/profile_step.py (its
# Python has torch, transformers and peft but not bitsandbytes, liger-kernel or Unsloth), for
# CPython 3.12 on x86-64 Linux, into .device/wheels (git-ignored). bitsandbytes and liger-kernel
# at the versions of requirements.txt; Unsloth and what it needs beyond such a machine's packages
# at the versions below, the newest that import with transformers 5.17.
#
#   bash bench/fetch_wheels.sh [CUDA]   # CUDA: the card's torch CUDA version, default 130
#   # then, there: pip install --no-deps --no-index --target DIR .device/wheels/*.whl
#
# To fit a 64 MiB transfer, two wheels are repacked smaller: bitsandbytes keeps only its library
# for the card's CUDA version (43 MB -> 2 MB), Unsloth drops its web frontend (studio/, 28 MB)
# that training does not use.
#
# bench/seed_random_gpu.sh (the whole DAG) also needs snakemake and its dependencies there.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=${1:-130}
UNSLOTH=(unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 tyro==1.0.17 torchao==0.17.0
         cut_cross_entropy==25.1.1 msgspec==0.23.0 hf_transfer==0.1.9 datasets==4.8.5
         dill==0.4.1 multiprocess==0.70.19 docstring-parser==0.18.0 typeguard==4.6.1)
mkdir -p .device/wheels
pins=("$(grep -i '^bitsandbytes==' requirements.txt)" "$(grep -i '^liger-kernel==' requirements.txt)" "${UNSLOTH[@]}")
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .device/wheels "${pins[@]}"
python3 - "$cuda" .device/wheels <<'EOF'
import re, sys, zipfile
from pathlib import Path

cuda, folder = sys.argv[1], Path(sys.argv[2])
drop = {"bitsandbytes-": lambda name: re.search(r"libbitsandbytes_(cuda(?!%s\.)|rocm)" % cuda, name),
        "unsloth-": lambda name: name.startswith("studio/")}
for wheel in folder.glob("*.whl"):
    unwanted = next((test for prefix, test in drop.items() if wheel.name.startswith(prefix)), None)
    if unwanted is None:
        continue
    with zipfile.ZipFile(wheel) as source:
        names = [name for name in source.namelist() if not unwanted(name)]
        if len(names) == len(source.namelist()):
            continue
        trimmed = wheel.with_suffix(".trimmed")
        with zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as target:
            for name in names:
                target.writestr(source.getinfo(name), source.read(name))
    trimmed.replace(wheel)
EOF
du -ch .device/wheels/*.whl
