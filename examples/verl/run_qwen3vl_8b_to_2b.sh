#!/usr/bin/env bash
# VGS distillation in verl 0.9 on one node of 8 GPUs: Qwen3-VL-8B teacher -> Qwen3-VL-2B student.
# Needs verl 0.9.x with its GPU dependencies (vLLM, Ray) and this package, installed from a checkout:
#   pip install "verl>=0.9,<0.10" && pip install --no-build-isolation ".[train]"
# Edit the paths in examples/verl/qwen3vl-8b-to-2b-vgs.yaml (or override them below), then run this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
python -m verl.trainer.main_ppo \
    --config-path "$PWD/examples/verl" --config-name qwen3vl-8b-to-2b-vgs \
    "$@"
