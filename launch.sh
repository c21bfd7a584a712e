#!/usr/bin/env bash
# Launch training on whatever is here: one process, one per GPU, N CPU ranks, or one launcher per SLURM node.
#   ./launch.sh [CONFIG.yaml] [key=value ...]        # 1 process, or one per visible GPU
#   NPROC=2 ./launch.sh configs/default.yaml         # N ranks per machine (CPU ranks use gloo)
#   srun --ntasks-per-node=1 ./launch.sh CONFIG ...  # inside a SLURM allocation: all nodes form one job
# Environment: PIPELINE_PYTHON (or PYTHON) picks the interpreter (default .venv/bin/python), NPROC the ranks per
# machine, MAIN_PORT the rendezvous port (default: derived from SLURM_JOB_ID, else a free one).
# The exit code is training's own: 0 done, 75 (EX_TEMPFAIL) stopped by SIGUSR1/SIGTERM after a checkpoint, so
# run it again (or requeue the job) to resume; 2 bad config; 70 stopped on non-finite loss/gradients; 74 a
# checkpoint (or another file) could not be written; 76 a rank was lost (the launcher returns the lost rank's code,
# 137 when it was SIGKILLed), a collective waited over dist.timeout_s or a loader worker delivered nothing for
# data.worker_timeout_s; 130 Ctrl-C (checkpoint saved). A repeated signal never changes the code.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PIPELINE_PYTHON:-${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}

# Under SLURM (one launch.sh per node, started by srun) the nodes of the allocation are the machines.
num_machines=1 machine_rank=0 main_ip=127.0.0.1
if [ -n "${SLURM_JOB_ID:-}" ] && [ "${SLURM_NNODES:-1}" -gt 1 ]; then
  num_machines=$SLURM_NNODES
  machine_rank=${SLURM_NODEID:?launch.sh: SLURM_NODEID is unset; start one launch.sh per node with srun}
  main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi

if [ "$nproc" -le 1 ] && [ "$num_machines" -eq 1 ]; then
  exec "$PY" -m pipeline train "$@"
fi
if [ "$gpus" -eq 0 ]; then export ACCELERATE_USE_CPU=1; fi
if [ -n "${MAIN_PORT:-}" ]; then
  port=$MAIN_PORT
elif [ -n "${SLURM_JOB_ID:-}" ]; then
  port=$(( 20000 + SLURM_JOB_ID % 20000 ))  # every node must agree without talking: derive it from the job
else
  port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
fi
# The config's precision, passed on so that accelerate's and ours agree (and accelerate warns of no missing value);
# a bad config stops here, before any rank starts.
precision=$("$PY" -m pipeline config show "$@" | sed -n 's/^  precision: //p')
case "$precision" in bf16|fp16) mixed_precision=$precision ;; *) mixed_precision=no ;; esac
echo "launch.sh: machine $machine_rank of $num_machines, $nproc process(es) each, main $main_ip:$port" >&2
# pipeline.distributed.launch is `accelerate launch` that forwards SIGUSR1/SIGTERM and returns the ranks' code.
exec "$PY" -m pipeline.distributed.launch --multi_gpu --num_processes $(( nproc * num_machines )) \
  --num_machines "$num_machines" --machine_rank "$machine_rank" --main_process_ip "$main_ip" \
  --main_process_port "$port" --mixed_precision "$mixed_precision" --dynamo_backend no -m pipeline train "$@"
