#!/usr/bin/env bash
# Run HERE, from the project root (package registries reachable): fetch into .whl/ (git-ignored) every wheel
# the GPU machine's bare Python 3.12 lacks for benchmarks/gpu_throughput.py: the shared script's (webdataset,
# braceexpand, omegaconf) and rich with its dependencies (~2 MB in all). Then carry .whl to the GPU machine
# and run `bash benchmarks/gpu_session.sh` there.
set -eu
../shared/gpu/wheels.sh
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${plat[@]}" -d .whl rich markdown-it-py mdurl pygments
ls .whl
du -sh .whl
