#!/bin/bash
# A sweep on a SLURM allocation: one `ray start` per node (the first the head), then the sweep
# joins that cluster. Submit from the repository root with `sbatch examples/slurm-sweep.sh SPEC.yaml`.
# Needs: the project installed on every node (the same path and virtual environment), a storage
# directory every node can write (a shared filesystem), and the same Ray auth token on every node
# (`ray get-auth-token --generate` once; a shared home directory shares ~/.ray/auth_token).
#SBATCH --job-name=entrannas-sweep
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --gpus-per-node=4
#SBATCH --time=24:00:00
set -euo pipefail
SPEC=${1:?usage: sbatch examples/slurm-sweep.sh SPEC.yaml [STORAGE]}
STORAGE=${2:-$PWD/runs}          # on the shared filesystem
PORT=6379
export RAY_AUTH_MODE=token

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
gpus=${SLURM_GPUS_ON_NODE:-0}

srun --nodes=1 --ntasks=1 -w "$head" ray start --head --node-ip-address="$head_ip" --port=$PORT \
    --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$gpus" --include-dashboard=false --block &
sleep 20
for node in "${nodes[@]:1}"; do
    srun --nodes=1 --ntasks=1 -w "$node" ray start --address="$head_ip:$PORT" \
        --num-cpus="$SLURM_CPUS_PER_TASK" --num-gpus="$gpus" --block &
done
sleep 20

.venv/bin/entrannas-tune sweep "$SPEC" --address "$head_ip:$PORT" --storage "$STORAGE"
