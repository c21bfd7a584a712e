#!/usr/bin/env bash
# Run ON the GPU machine, from the project root, with .whl/ carried (made here by benchmarks/gpu_wheels.sh):
#   bash benchmarks/gpu_session.sh synthetic   # ResNet-50 and -18, compile off and on, synthetic batches
#   bash benchmarks/gpu_session.sh shards      # ResNet-50 compiled, from JPEG shards: nvJPEG, then CPU workers
#   bash benchmarks/gpu_session.sh all         # everything gpu_throughput.py does by default (may pass 10 min)
# Further arguments go to benchmarks/gpu_throughput.py. It installs the carried wheels beside the machine's own
# torch, records what the machine is, and leaves the JSON and the log in $OUT (default benchmarks/results).
set -euo pipefail
part=${1:-synthetic}
shift || true
case $part in
  synthetic) args=(--sources synthetic --profile) ;;
  shards) args=(--models resnet50 --compile on --sources shards-gpu-decode shards-cpu-decode --profile) ;;
  all) args=(--profile) ;;
  *) echo "gpu_session: unknown part '$part' (synthetic, shards or all)" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import torch, torchvision, accelerate, torchmetrics, webdataset, omegaconf, rich, safetensors
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
  | tee "$out/gpu_machine.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$out/gpu_machine.txt" 2>&1 || true
python3 benchmarks/gpu_throughput.py "${args[@]}" --work /tmp/gpu_work --out "$out/gpu_throughput_$part.json" "$@" \
  2>&1 | tee "$out/gpu_throughput_$part.log"
