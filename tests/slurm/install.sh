#!/usr/bin/env bash
# Install what the single-node test cluster needs: SLURM 22.05 from Debian
# (controller, node daemon, client tools), munge for authentication, and the
# snakemake SLURM executor plugin. Run as root (CI does); safe to rerun.
set -euo pipefail

SLURM_PLUGIN_VERSION="${SLURM_PLUGIN_VERSION:-2.8.0}"

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

python -m pip install -q "snakemake-executor-plugin-slurm==${SLURM_PLUGIN_VERSION}"
python -c "import snakemake_executor_plugin_slurm" \
    && echo "install.sh: snakemake-executor-plugin-slurm ${SLURM_PLUGIN_VERSION} ok"
