#!/usr/bin/env bash
# One prepared GPU run (device tool): train the candidate tiny-model configurations side by
# side and score each on 200 held-out images. Carry .whl/ (transformers 5.24 wheel).
#   STEPS=1800 MINUTES=5.5 bash scripts/gpu_sweep.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/sweep-out}
mkdir -p $OUT
if [ -d .whl ] && [ "${DEVICE:-cuda}" = cuda ]; then  # the GPU image ships an older transformers
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-1800}
NTRAIN=${NTRAIN:-12000}
NHELD=${NHELD:-200}
(nvidia-smi -L; $PY -c "import torch, transformers, sys; print(sys.version); print(torch.__version__, transformers.__version__)") > $OUT/env.txt 2>&1
run() {  # name spec pos-init-std [extra args]
  local name=$1 spec=$2 std=$3; shift 3
  $PY scripts/shape_sweep.py --name $name --out /tmp/sweep-models --spec "$spec" --position-init-std $std \
    --steps $STEPS --batch-size 128 --lr 3e-3 --minutes ${MINUTES:-5.5} --device $DEVICE --threads 2 \
    --n-train $NTRAIN --n-heldout $NHELD "$@" > $OUT/$name.log 2>&1 &
}
P2='{"patch_size": 2, "max_soft_tokens": 280}'
UP='{"max_soft_tokens": 280}'
run b8 '{}' 0.5
run p2 "$P2" 0.5
run up "$UP" 0.5
run p2-ones "$P2" 0
run up-v128 '{"max_soft_tokens": 280, "vision_hidden": 128}' 0.5
run b8-wide '{"text_hidden": 256, "intermediate": 512, "moe_intermediate": 128}' 0.5
run p2-cue "$P2" 0.5 --cue
run up-cue "$UP" 0.5 --cue
wait
for f in $OUT/*.log; do tail -n 1 $f; done | tee $OUT/summary.jsonl
# What comes back is at most 8 files of <= 16 MiB: one log, three model bundles.
for f in $OUT/*.log; do echo "== $f"; cat $f; done > $OUT/all.txt && rm -f $OUT/*.log
cd /tmp/sweep-models
tar czf $OUT/models1.tgz b8 p2 up p2-ones 2>/dev/null
tar czf $OUT/models2.tgz up-v128 p2-cue up-cue 2>/dev/null
tar czf $OUT/models3.tgz b8-wide 2>/dev/null
ls -la $OUT
