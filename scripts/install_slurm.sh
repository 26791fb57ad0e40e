#!/usr/bin/env bash
# Install Debian's slurm-wlm and munge for the local-Slurm tests (tests/test_slurm.py), if missing.
# Idempotent and quick when already installed; needs root and apt. The tests start and stop their own
# private cluster (tests/slurm_cluster.py) and skip, saying why, when Slurm cannot run here.
set -euo pipefail
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "install_slurm: not root or no apt-get; Slurm tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
