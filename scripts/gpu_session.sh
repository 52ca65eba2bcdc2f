#!/usr/bin/env bash
# The one prepared GPU check (device tool). Needs .whl/ carried (transformers 5.24 wheel:
# the GPU image has 5.17, which predates DiffusionGemma). Writes everything under $OUT.
#   STEPS=5000 bash scripts/gpu_session.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L | tee $OUT/env.txt
python3 -c "import torch, transformers, sys; print(sys.version); print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))" | tee -a $OUT/env.txt
STEPS=${STEPS:-5000}
mkdir -p /tmp/m
python3 scripts/train_shipped.py --which clean --out /tmp/m/tiny-shapes --steps $STEPS --device cuda --threads 4 --minutes ${MINUTES:-3.5} --batch-size ${BATCH:-128} --lr ${LR:-3e-3} > $OUT/train_clean.log 2>&1 &
P1=$!
python3 scripts/train_shipped.py --which cue --out /tmp/m/tiny-shapes-cue --steps $STEPS --device cuda --threads 4 --minutes ${MINUTES:-3.5} --batch-size ${BATCH:-128} --lr ${LR:-3e-3} > $OUT/train_cue.log 2>&1 &
P2=$!
wait $P1 $P2
tail -n 2 $OUT/train_clean.log $OUT/train_cue.log
tar czf $OUT/models.tgz -C /tmp/m tiny-shapes tiny-shapes-cue
[ -n "${TIMING:-}" ] && python3 scripts/gpu_timing.py --device cuda --size mid --n 6 --json $OUT/timing_mid.json 2>&1 | tail -n 30
