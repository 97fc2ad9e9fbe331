#!/usr/bin/env bash
# The whole petal flow on this machine, from nothing: Python env and MinIO (built into the cache on
# first use), a synthetic 6-class image set, upload to MinIO as shards, 2-rank DDP training with
# torchrun, results collected into runs/<name>/ and a few held-out images classified.
#
#   scripts/demo.sh            # PETAL_DEMO_EPOCHS (default 5) and PETAL_CACHE change the defaults
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

scripts/testbed.sh install all
scripts/testbed.sh minio up
eval "$(scripts/testbed.sh env)"

name="demo-$(date +%Y%m%d-%H%M%S)"
work="$ROOT/runs/$name"
mkdir -p "$work"
python scripts/make_synthetic_dataset.py "$work/data" --classes 6 --per-class 60 --eval-per-class 30 >/dev/null
python scripts/upload_dataset.py "$work/data" s3://petal/datasets/demo-shapes | tail -n 1

torchrun --nproc-per-node 2 -m training \
  --data s3://petal/datasets/demo-shapes --output "s3://petal/runs/$name" \
  --arch resnet18 --freeze none --pretrained none --image-size 64 --batch-size 16 --workers 1 \
  --epochs "${PETAL_DEMO_EPOCHS:-5}" | tee "$work/stdout.jsonl"

python scripts/collect_run.py "s3://petal/runs/$name" "$work" >/dev/null
echo
echo "Held-out images, classified with the best checkpoint:"
python scripts/predict.py "$work/best.pt" "$work"/data/test/{1,3,5}/*_00000.jpg --top-k 2
echo
echo "Summary:   $(tail -n 1 "$work/stdout.jsonl")"
echo "Results:   $work/{best.pt,metrics.jsonl,curves.png,per_class.png}"
echo "In MinIO:  s3://petal/runs/$name  (eval \"\$(scripts/testbed.sh env)\"; scripts/testbed.sh minio down)"
