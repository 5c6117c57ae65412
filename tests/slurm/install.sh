#!/usr/bin/env bash
# Install what the single-node test cluster needs: SLURM 22.05 from Debian
# (controller, node daemon, client tools) and munge for authentication. The
# snakemake SLURM executor plugin comes from requirements.txt. Run as root
# (CI does); safe to rerun.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: must run as root (it calls apt-get)" >&2
    exit 1
fi

need_apt=0
for bin in slurmctld slurmd sbatch squeue sinfo scontrol srun munged; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_apt=1
done
if [ "$need_apt" -eq 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge
else
    echo "install.sh: slurm and munge already installed"
fi

