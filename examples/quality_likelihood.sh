#!/usr/bin/env bash
# Likelihood LoRA and X-Cross on real data at 25/50/100% of a target training pool, then the quality rows
# in the quality results format. Every step is an xkern command; the sizes fit the 2-core CPU VM (about 45 minutes).
#
#   bash examples/quality_likelihood.sh DATA TARGET SOURCE_A,SOURCE_B OUT [POOL_USERS] [EVAL_USERS]
#   e.g. bash examples/quality_likelihood.sh ../shared/data/amazon-xcross Tools Toys,Sports runs/q 80 200
#
# Source LoRAs: one per source domain (xkern train-lora, causal LM on the next item's title), kept if OUT
# already has them. Per fraction f of POOL_USERS target users (nested, seeded): a target-only LoRA
# (xkern train-lora) and X-Cross over the frozen source LoRAs (xkern train-xcross --scoring likelihood),
# trained on exactly those users. Then examples/quality_likelihood.py ranks EVAL_USERS test users
# (target + 29 uniform negatives) with every model and the baselines, into
# bench/results/quality-<TARGET>-likelihood.json. Environment: SOURCE_STEPS (10), LORA_EPOCHS (2),
# XCROSS_EPOCHS (1), XCROSS_NEG (1), THREADS (2).
set -euo pipefail
DATA=$1 TARGET=$2 SOURCES=$3 OUT=$4 POOL=${5:-80} EVAL=${6:-200}
SOURCE_STEPS=${SOURCE_STEPS:-10} LORA_EPOCHS=${LORA_EPOCHS:-2} XCROSS_EPOCHS=${XCROSS_EPOCHS:-1}
XCROSS_NEG=${XCROSS_NEG:-1}
export OMP_NUM_THREADS=${THREADS:-2}
common=(--data "$DATA" --model smollm2 --no-progress)
rows=() adapters=()
for S in ${SOURCES//,/ }; do
  name=$(echo "$S" | tr '[:upper:]' '[:lower:]')
  if [ ! -f "$OUT/src-$S/adapter/adapter_config.json" ]; then
    /usr/bin/time -f "src-$S: %e s" xkern train-lora "${common[@]}" --domain "$S" --max-steps "$SOURCE_STEPS" \
      --max-train-users 80 --max-val-users 20 --out "$OUT/src-$S"
  fi
  rows+=(--lora "$name=$OUT/src-$S") adapters+=(--adapter "$name=$OUT/src-$S/adapter")
done
for f in 0.25 0.5 1.0; do
  K=$(python -c "print(round($POOL * $f))")
  /usr/bin/time -f "lora-$K: %e s" xkern train-lora "${common[@]}" --domain "$TARGET" --max-train-users "$K" \
    --epochs "$LORA_EPOCHS" --batch-size 8 --max-val-users 20 --out "$OUT/lora-$K"
  /usr/bin/time -f "xcross-$K: %e s" xkern train-xcross "${common[@]}" --target "$TARGET" --scoring likelihood \
    --integrator-norm rms --likelihood-reduce mean "${adapters[@]}" --max-train-users "$K" \
    --epochs "$XCROSS_EPOCHS" --batch-size 4 --n-neg "$XCROSS_NEG" --val-neg 9 --max-val-users 12 \
    --grad-checkpointing --out "$OUT/xcross-$K"
  rows+=(--lora "lora-$K=$OUT/lora-$K" --xcross "xcross-$K=$OUT/xcross-$K" --fraction "lora-$K=$f"
         --fraction "xcross-$K=$f")
done
python examples/quality_likelihood.py --data "$DATA" --target "$TARGET" --eval-users "$EVAL" --calibrate "${rows[@]}"
