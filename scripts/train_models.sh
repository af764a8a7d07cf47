#!/usr/bin/env bash
# Rebuild every shipped checkpoint in apps/parotid/model from synthetic cohorts, on CPU.
# This is the exact recipe of the shipped checkpoints (seeds, iterations, learning rates, fine-tuning
# chain). Measured on the idle 2-core CPU: the last segmentation round 266 s, the last contour_box round
# 172 s, both classifiers 52 s; 120 studies are generated in ~73 s. NOTE: the shipped segmentation checkpoints were trained on cohorts
# 31/32 made by the generator at commit ffc85bd (smaller field of view) and 41 made at 105f260; with
# today's generator the same commands give close but not bit-identical models.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-/tmp/parotid-train}
OUT=${OUT:-apps/parotid/model}
W=$DATA/work
mkdir -p "$DATA" "$W"
for s in 31 32 41; do
  [ -f "$DATA/s$s/datastore_v2.json" ] || .venv/bin/parotid-synth --out "$DATA/s$s" --n $([ $s = 41 ] && echo 80 || echo 70) --seed $s --no-raw --quiet
done
[ -f "$DATA/c101/datastore_v2.json" ] || .venv/bin/parotid-synth --out "$DATA/c101" --n 240 --seed 101 --no-raw --quiet
seg() { $PY -m parotid.segmentation.train --threads 2 "$@"; }
# whole-study segmentation: from scratch, then two fine-tuning rounds on more data
seg --cohort "$DATA/s31" "$DATA/s32" --model segmentation --out "$W/a" --iterations 1600 --seed 0
seg --cohort "$DATA/s41" "$DATA/s31" --model segmentation --out "$W/b" --iterations 1200 --lr 1e-3 --seed 1 --init-from "$W/a/segmentation.pt"
seg --cohort "$DATA/s41" "$DATA/s31" "$DATA/s32" --model segmentation --out "$OUT" --iterations 5000 --lr 1e-3 --seed 2 --init-from "$W/b/segmentation.pt"
# box-prompted contouring: from scratch, then one fine-tuning round
seg --cohort "$DATA/s41" "$DATA/s32" --model contour_box --out "$W/c" --iterations 2500 --seed 0
seg --cohort "$DATA/s41" "$DATA/s31" "$DATA/s32" --model contour_box --out "$OUT" --iterations 4000 --lr 1e-3 --seed 3 --init-from "$W/c/contour_box.pt"
# classifiers (subtype4 and benign_malignant): late fusion Spl, T2 required, branch dropout (train.py defaults)
$PY -m parotid.classification.train --cohort "$DATA/c101" --out "$OUT" --threads 2
