#!/usr/bin/env bash
# Issue 20's figures on whatever GPU this runs on, with no checkpoint and no dataset: tint's
# stand-in pool (random weights of ViT-B/32's real shapes, generated pixels in the eight
# tasks' real test-set sizes, 87,433 images) through `tint bench`. Prints the card, then
# evaluation against the raw forward (batch 512, bf16), every adaptation step against a plain
# forward+backward, peak memory against the memory model, then whole Model Tinting runs
# (4,000 steps + experts' logits + scoring: the goal is <= 30 s at ViT-B/32 x 8). Put the
# figures in the README with the card's name. About eight minutes on an H200 (generating 13 GB
# of pixels each call; compiling).
#
#   bash scripts/gpu_figures.sh                   # ViT-B/32 × vit8
#   WHOLE_EAGER=1 bash scripts/gpu_figures.sh     # + the eager whole run
#   WHOLE_L14=1 bash scripts/gpu_figures.sh       # + ViT-L/14 × vit20 whole, bf16, streamed
#                                                 #   pixels (goal: <= 15 min within 40 GB)
set -euo pipefail
TINT=${TINT:-tint}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# first, on this GPU: the compiled steps (CUDA graphs) learn what the eager ones do, and no
# Model Tinting step reads anything back (the tests' CUDA cases; skipped where no CUDA is)
if python -c "import pytest" 2>/dev/null; then
    python -m pytest -q -p no:cacheprovider -rs tests/test_adaptation.py -k "compiled or waits" \
        || echo "the GPU checks above FAILED: runtime.compile=true is not safe on this card"
fi
$TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[evaluation,adaptation]" \
    runtime.resident_pixels=auto warmup=5 repeats=30 eval_repeats=3 "$@"
# the same steps with the λ merge and the encoder through torch.compile (CUDA graphs)
$TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[adaptation]" \
    runtime.compile=true warmup=10 repeats=30 "$@"
# a whole run: Model Tinting's 500 epochs x 8 tasks as tint merge runs it, compiled (and
# eager with WHOLE_EAGER=1: about 3 minutes at the H200's measured 36 ms a step)
$TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[run]" runtime.compile=true "$@"
if [ "${WHOLE_EAGER:-0}" = 1 ]; then
    $TINT bench pool=stand_in tasks=vit8 encoder=clip_vit_b32 "parts=[run]" "$@"
fi
if [ "${WHOLE_L14:-0}" = 1 ]; then
    $TINT bench pool=stand_in tasks=vit20 encoder=clip_vit_l14 "parts=[run]" pool.dtype=bf16 \
        vectors_dtype=bf16 runtime.resident_pixels=never runtime.compile=true "$@"
fi
