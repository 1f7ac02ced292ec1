#!/usr/bin/env bash
# Reproduce docs/zeroshot.md: pre-train the zero-shot model on dead-leaves (the default configuration, the
# best-measuring one of docs/depth.md, at 128 px; CPU, about 40 min on 2 shared cores), score it and its
# initialisation with `gmae eval-zeroshot`, and draw the readouts of skimage photos and dead-leaves images.
# Usage: scripts/zeroshot_results.sh [RUN_DIR]   (default runs/zeroshot; an interrupted run resumes)
set -euo pipefail
RUN=${1:-runs/zeroshot}
GMAE=${GMAE:-gmae}
PYTHON=${PYTHON:-python}
STEPS=2000

# 1. Pre-train: tiny ViT encoder at 128 px with 16 px patches (64 tokens), k = 256 Gaussians, the authors'
#    camera and no depth-order gradient (the defaults; named here so the run stays this one if they change).
if [ -e "$RUN/checkpoint-$(printf %07d $STEPS).pt" ]; then
  echo "$RUN already trained"
elif ls "$RUN"/checkpoint-*.pt >/dev/null 2>&1; then
  $GMAE pretrain --out "$RUN" --resume --steps $STEPS
else
  $GMAE pretrain --img-size 128 --patch-size 16 --num-gaussians 256 --steps $STEPS \
      --camera authors --depth-grad off --out "$RUN"
fi
CKPT="$RUN/checkpoint-$(printf %07d $STEPS).pt"

# 2. Scores on 200 held-out dead-leaves images: the trained model, then the same model at initialisation.
$GMAE eval-zeroshot --checkpoint "$CKPT" --json > "$RUN/eval-trained.json"
$GMAE eval-zeroshot --checkpoint "$CKPT" --random-init --json > "$RUN/eval-init.json"

# 3. Paper-style figures for photos bundled with scikit-image, and for two dead-leaves images.
FIGS=docs/figures
mkdir -p "$FIGS/inputs"
$PYTHON - "$FIGS/inputs" <<'PY'
import sys
from PIL import Image
from skimage import data
from gmae.data import DeadLeaves
from gmae.evaluate.zeroshot import EVAL_SEED

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
