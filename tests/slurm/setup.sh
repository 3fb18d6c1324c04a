#!/usr/bin/env bash
# Install what tests/test_launch.py's real SLURM test needs: slurmctld, slurmd, the client tools and
# munge (Debian/Ubuntu). Idempotent: does nothing when they are already installed. Needs root.
set -euo pipefail
need=()
for cmd in slurmctld slurmd sbatch munged; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || need+=("$cmd")
done
if [ "${#need[@]}" -eq 0 ]; then
  echo "slurm and munge already installed"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "tests/slurm/setup.sh: missing ${need[*]}; run as root to install slurm-wlm and munge" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "installed slurm-wlm and munge"
