#!/usr/bin/env bash
# Scale-out throughput and MFU on this machine's GPUs, in under 5 minutes (for a session with lent GPUs).
#
#   bash benchmarks/gpu_parallel.sh            # then paste the printed tables into benchmarks/RESULTS.md
#
# One GPU: the 1-GPU baseline (tokens/s, MFU, peak memory vs `glassmind plan`). Two or more: also data
# parallel (DDP), FSDP, ZeRO-1/2, tensor and pipeline parallel over all of them (NCCL), same global batch.
# Model: decoder, d_model 1024, 12 layers, 16 heads, vocab 32768 (~180M parameters), 64 x 1024 tokens per
# step, bf16 autocast / FSDP bf16 policy. Each launch has a deadline (launch.py kills its process group).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
n=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$n" -lt 1 ]; then echo "no CUDA device: nothing to measure" >&2; exit 1; fi
layouts=""
if [ "$n" -ge 2 ]; then
  tp=$n; while [ $((16 % tp)) -ne 0 ]; do tp=$((tp - 1)); done            # tp must divide the 16 heads
  layouts="dp=$n;fsdp=$n;dp=$n,zero=1;dp=$n,zero=2;tp=$tp;pp=2,microbatches=4"
fi
# 1 round: startup (~20 s per launch) dominates; 8 timed steps of ~0.1-1 s each
timeout 290 python benchmarks/bench_parallel.py --device cuda --preset gpu --mp bf16 --nproc "$n" \
  --rounds 1 --steps 8 --micro-batch 8 --timeout 120 --layouts "$layouts"
python -m glassmind plan --devices "$n" --memory-gb "$(python -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30))")" \
  --vocab-size 32768 --context-length 1024 --d-model 1024 --n-heads 16 --n-layers 12 --positional rope \
  --activation swiglu --norm rmsnorm --no-bias --global-batch 64 --micro-batch 8 --mp bf16
