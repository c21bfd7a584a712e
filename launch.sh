#!/usr/bin/env bash
# Launch training on whatever is here: one process, one per GPU, or N CPU ranks.
#   ./launch.sh [CONFIG.yaml] [key=value ...]        # 1 process, or one per visible GPU
#   NPROC=2 ./launch.sh configs/default.yaml         # N ranks (CPU ranks use gloo)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
if [ "$nproc" -le 1 ]; then
  exec "$PY" -m pipeline train "$@"
fi
if [ "$gpus" -eq 0 ]; then export ACCELERATE_USE_CPU=1; fi
port=${MAIN_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
exec "$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$nproc" --num_machines 1 \
  --main_process_port "$port" -m pipeline train "$@"
