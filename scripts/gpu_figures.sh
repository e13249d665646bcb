#!/usr/bin/env bash
# Issue 20's figures on whatever GPU this runs on, with no checkpoint and no dataset: tint's
# stand-in pool (random weights of ViT-B/32's real shapes, generated pixels in the eight
# tasks' real test-set sizes, 87,433 images) through `tint bench`. Prints the card, then
# evaluation against the raw forward (batch 512, bf16), every adaptation step against a plain
# forward+backward, peak memory against the memory model. Put the figures in the README with
# the card's name. A few minutes on an H200 (generating 13 GB of pixels, twice; compiling).
#
#   bash scripts/gpu_figures.sh                 # ViT-B/32 × vit8
#   bash scripts/gpu_figures.sh encoder=clip_vit_l14 tasks=vit20 pool.dtype=bf16
set -euo pipefail
TINT=${TINT:-tint}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
$TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[evaluation,adaptation]" \
    runtime.resident_pixels=auto warmup=5 repeats=30 eval_repeats=3 "$@"
# the same steps with the λ merge and the encoder through torch.compile (CUDA graphs)
$TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[adaptation]" \
    runtime.compile=true warmup=10 repeats=30 "$@"
