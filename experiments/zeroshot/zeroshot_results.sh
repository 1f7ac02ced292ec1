#!/usr/bin/env bash
# Reproduce docs/reports/zeroshot.md: pre-train the zero-shot model on dead-leaves (the tiny preset's default
# configuration, out of the collapsed regime: docs/reports/depth.md), score it and its initialisation with
# `gmae eval-zeroshot`, and draw the readouts of skimage photos and dead-leaves images.
# Usage: [SIZE=64 STEPS=1200] experiments/zeroshot/zeroshot_results.sh [RUN_DIR]   (default runs/zeroshot; an interrupted
# run resumes; a finished run and its scores are reused). docs/reports/zeroshot.md's figures are SIZE=64 STEPS=1200
# on the run folder of `python experiments/layout/layout_map.py all25-pointer` (the same flags, seed 0);
# SIZE=128 STEPS=2000 (the default) takes about 40 min on 2 shared cores.
set -euo pipefail
RUN=${1:-runs/zeroshot}
GMAE=${GMAE:-gmae}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-2000}
SIZE=${SIZE:-128}
if [ "$SIZE" = 128 ]; then SHAPE="--img-size 128 --patch-size 16 --num-gaussians 256"; else SHAPE="--img-size $SIZE"; fi

# 1. Pre-train: tiny ViT encoder (at 128 px with 16 px patches, 64 tokens, and k = 256 Gaussians), the authors'
#    camera, c = 3, centred z, no depth-order gradient, the loss on every pixel with a quarter masked and pointer
#    positions (the defaults; named here so the run stays this one if they change).
if [ -e "$RUN/checkpoint-$(printf %07d $STEPS).pt" ]; then
  echo "$RUN already trained"
elif ls "$RUN"/checkpoint-*.pt >/dev/null 2>&1; then
  $GMAE pretrain --out "$RUN" --resume --steps $STEPS
else
  $GMAE pretrain $SHAPE --steps $STEPS --camera authors --max-scale 3 --depth-param centred --depth-grad off \
      --loss all --mask-ratio 0.25 --position-source pointer --out "$RUN"
fi
CKPT="$RUN/checkpoint-$(printf %07d $STEPS).pt"

# 2. Scores on 200 held-out dead-leaves images: the trained model, then the same model at initialisation.
if [ ! -s "$RUN/eval-init.json" ]; then
  $GMAE eval-zeroshot --checkpoint "$CKPT" --json > "$RUN/eval-trained.json"
  $GMAE eval-zeroshot --checkpoint "$CKPT" --random-init --json > "$RUN/eval-init.json"
fi

# 3. Paper-style figures for photos bundled with scikit-image, and for two dead-leaves images.
FIGS=docs/reports/figures
mkdir -p "$FIGS/inputs"
$PYTHON - "$FIGS/inputs" <<'PY'
import sys
from PIL import Image
from skimage import data
from gmae.data import DeadLeaves
from gmae.data import EVAL_SEED

out = sys.argv[1]
for name in ("astronaut", "chelsea"):
    Image.fromarray(getattr(data, name)()).save(f"{out}/{name}.png")
leaves = DeadLeaves(128, seed=EVAL_SEED)
for i in (0, 1):
    img = (leaves.sample(i).image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(img).save(f"{out}/deadleaves{i}.png")
PY
for readout in layers edges segment gaussians; do
  $GMAE $readout "$FIGS"/inputs/*.png --checkpoint "$CKPT" --out "$FIGS"
done
echo "scores: $RUN/eval-trained.json, $RUN/eval-init.json; figures: $FIGS"
