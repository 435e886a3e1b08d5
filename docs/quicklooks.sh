#!/usr/bin/env bash
# Regenerates the README's per-task quicklooks (docs/quicklook_{forest,insar,change}.png) the way a user would
# get them: train each task's Prithvi config in its tiny CPU variant on the config's synthetic data, mosaic
# 2 x 4 validation tiles into one scene, and run launch/predict.py over it. Prints each job's last validation
# record, which the README's captions quote. ~10 min on 2 cores. Usage: bash docs/quicklooks.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STEPS=${1:-150}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

for task in forest insar change; do
  job=runs/quicklook_$task
  echo "[quicklooks] $task: training tiny Prithvi for $STEPS steps into $job"
  "$PY" launch/train.py --config "launch/configs/prithvi_$task.yaml" model.backbone=prithvi_eo_tiny \
    "run.max_steps=$STEPS" run.eval_every=50 run.checkpoint_every=50 run.progress=false "checkpoint.dir=$job"
  root=$("$PY" -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['data']['root'])" "$job/config.yaml")
  # rows 0 and 1 of the validation grid (16 tiles a row), 4 tiles each: a 2 x 4-tile scene per date
  "$PY" - "$root" "$job" <<'EOF'
import sys
from pathlib import Path
from rasterio.merge import merge

root, job = Path(sys.argv[1]), Path(sys.argv[2])
images = sorted((root / "val" / "images").glob("*.tif"))
for date in (["_t0", "_t1"] if any(p.stem.endswith("_t1") for p in images) else [""]):
    tiles = [p for p in images if p.stem.endswith(date)] if date else images
    merge([str(p) for p in tiles[0:4] + tiles[16:20]], dst_path=str(job / f"scene{date}.tif"))
EOF
  inputs=(--input "$job/scene.tif")
  [ "$task" = change ] && inputs=(--input "$job/scene_t0.tif" --input2 "$job/scene_t1.tif")
  "$PY" launch/predict.py --job "$job" "${inputs[@]}" --out "$job/pred.tif" --tile 64 --overlap 16 \
    --quicklook "docs/quicklook_$task.png"
  echo "[quicklooks] $task: last validation record:"
  grep '"split": "val"' "$job/metrics.jsonl" | tail -n 1
done
