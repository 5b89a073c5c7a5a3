#!/usr/bin/env bash
# Run HERE (a machine with a package registry): the wheels the lent GPU machine lacks (Python 3.12, x86-64),
# into .whl/ at the repository root (git-ignored), carried there by `run(..., carry=[".whl"])`.
# Not carried: Transformer Engine (transformer-engine-cu13 2.20.2 is a 276.5 MB wheel, over the 64 MiB
# limit; transformer-engine-torch is an sdist that must compile there).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  megatron-core==0.16.1 diffusers==0.42.1
du -ch .whl/*.whl
