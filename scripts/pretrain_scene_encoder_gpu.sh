#!/usr/bin/env bash
# Pre-train the dense scene benchmark's θ0 (smp tu-resnet10t encoder) on one GPU, data generation included.
# Run from the repository root on a machine with torch, timm, numpy and safetensors (no smp needed):
#   OUT=/some/dir bash scripts/pretrain_scene_encoder_gpu.sh
# Writes $OUT/scene_encoder/{weights.safetensors,weights.sha256,recipe.json} and $OUT/pretrain_scene_encoder.log.
# Training stops by --time-budget seconds whatever the GPU's speed (the cosine schedule ends there), so
# the whole run takes about budget + 1 min (imports, spawning the renderers, the initial pool, export).
# Ship it: cp "$OUT"/scene_encoder/* tvq_lightning/assets/scene_encoder/
set -euo pipefail
OUT="${OUT:-runs/pretrain}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
WORKERS="${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" -c "import torch, timm, safetensors; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
"$PY" -m tvq_lightning.data.scenes.pretrain --device cuda --out "$OUT/scene_encoder" \
    --steps "${STEPS:-30000}" --batch "${BATCH:-256}" --lr "${LR:-2e-3}" --weight-decay 0.05 --warmup 0.03 \
    --pool 16384 --fresh "${FRESH:-48}" --buffer 262144 --workers "$WORKERS" \
    --time-budget "${BUDGET:-300}" --log-every 500 --seed 0 2>&1 | tee "$OUT/pretrain_scene_encoder.log"
cat "$OUT/scene_encoder/weights.sha256"
