#!/usr/bin/env bash
# How the shipped demo model (engine/demo/) and its ablations are made, end to end, on a CPU.
#
#   bash train/demo_recipe.sh WORKDIR [STAGE...]
#
# Stages (default: all, in this order): data vae init cache full ablations package gallery eval ablation-eval.
# Knobs (environment): FULL_STEPS (default 6000), ABLATION_STEPS (800), EVAL_CLIPS (96), ABLATION_EVAL_CLIPS
# (32), ABLATION_EVAL_STEPS (25), THREADS (1: torch threads per process, so that the full run and an ablation
# run side by side on a 2-core machine), RESUME (non-empty: a run continues from its last checkpoint),
# ONLY (no-last or no-text: train or evaluate just that run; full too for ablation-eval), EVAL_THREADS (2; 1
# when a training run shares the 2 cores: oversubscribed OpenMP threads slowed sampling about 5x here),
# GUIDANCE (ablation-eval: a guidance scale instead of the packaged folders' default; tags the output names),
# TEXT_STEPS (600, as the shipped demo: `demo init` pretrains the text encoder that many steps on the caption
# grammar before it is frozen, see train/text_pretrain.py; 0 keeps its seeded random weights, as the earlier
# demo had, whose UNet never learned the motion words).
# Deviations from the paper's recipe, for 8-frame 64x64 clips (see train/demo.py and the model README):
#   --last-frame-window 1  the paper picks among the last 3 of 16 frames; here one frame moves an object up to
#                          4.6 px, so a window of 3 would teach the clip to end up to 2 frames past the instruction;
#   --perturb last         only the last-frame instruction is noised to t=100 (the paper's robustness measure for
#                          rough last frames); the first frame is always the real one, and kept exact;
#   --dropout 0            no dropout in the temporal convs (a small model on plenty of data);
#   v-prediction           `demo init` writes a v_prediction scheduler and the trainer follows it (the paper
#                          predicts epsilon; see DEMO_PREDICTION in train/demo.py for the measured reason).
set -euo pipefail
W=${1:?usage: demo_recipe.sh WORKDIR [STAGE...]}
shift || true
STAGES=${*:-data vae init cache full ablations package gallery eval ablation-eval}
FULL_STEPS=${FULL_STEPS:-6000}
ABLATION_STEPS=${ABLATION_STEPS:-800}
EVAL_CLIPS=${EVAL_CLIPS:-96}
ABLATION_EVAL_CLIPS=${ABLATION_EVAL_CLIPS:-32}
ABLATION_EVAL_STEPS=${ABLATION_EVAL_STEPS:-25}
THREADS=${THREADS:-1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$W"

train() {  # train OUT_NAME STEPS [extra flags...]
  local name=$1 steps=$2
  shift 2
  OMP_NUM_THREADS=$THREADS pdengine train --model "$W/init" --latent-cache "$W/cache/videos" \
    --images "$W/cache/images" --image-every 8 --resolution 64 --frames 8 --batch-size 8 --lr 3e-4 \
    --warmup-steps 200 --dropout 0 --perturb last --last-frame-window 1 --ema 0.995 --ema-device cpu \
    --device cpu --dtype fp32 --num-workers 0 --save-every 200 --keep 100 --seed 0 --no-tensorboard \
    --log-every 50 --steps "$steps" --out "$W/runs/$name" "$@"
}

for stage in $STAGES; do
  echo "== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    data) pdengine data synth --out "$W/data" --videos 2000 --images 1000 --frames 8 --seed 0 ;;
    vae) pdengine train-vae --data "$W/data/images.csv" --data "$W/data/train.csv" \
           --eval-data "$W/data/heldout.csv" --out "$W/vae" --steps 2500 --schedule cosine --lr 1e-3 --loss mse ;;
    init) pdengine demo init --vae "$W/vae" --out "$W/init" --seed 0 --text-steps "${TEXT_STEPS:-600}" ;;
    cache)
      pdengine cache-latents --model "$W/init" --data "$W/data/train.csv" --resolution 64 --frames 8 \
        --out "$W/cache/videos" --device cpu
      pdengine cache-latents --model "$W/init" --images "$W/data/images.csv" --resolution 64 \
        --out "$W/cache/images" --device cpu ;;
    full) train full "$FULL_STEPS" ${RESUME:+--resume} ;;
    ablations)
      # The paper's two ablations, trained like the full model for ABLATION_STEPS steps and compared with
      # the full run's checkpoint at the same step.
      [ -n "${ONLY:-}" ] && [ "$ONLY" != no-last ] || train no-last "$ABLATION_STEPS" --eta 1.0 ${RESUME:+--resume}  # never a last frame
      [ -n "${ONLY:-}" ] && [ "$ONLY" != no-text ] || train no-text "$ABLATION_STEPS" --text-drop 1.0 ${RESUME:+--resume}  # always the empty prompt
      ;;
    package)
      # The full run is stopped when the session's time is spent: ship its last checkpoint (CHECKPOINT=step-N
      # to pick one). engine/demo/README.md (numbers from the eval stage) is written by hand afterwards.
      pdengine demo package --run "$W/runs/full" --checkpoint "$W/runs/full/checkpoints/${CHECKPOINT:-$(cat "$W/runs/full/checkpoints/latest")}" \
        --out "$HERE/engine/demo" --overwrite ;;
    gallery) OMP_NUM_THREADS=${EVAL_THREADS:-2} pdengine demo gallery --model demo --data "$W/data" --out "$HERE/engine/demo/gallery" ;;
    eval)
      mkdir -p "$W/eval"
      OMP_NUM_THREADS=${EVAL_THREADS:-2} pdengine eval --model demo --data "$W/data" --limit "$EVAL_CLIPS" --device cpu \
        --json "$W/eval/demo.json" | tee "$W/eval/demo.md" ;;
    ablation-eval)
      # Each run's EMA weights at step ABLATION_STEPS, on the same held-out clips, seeds and settings.
      mkdir -p "$W/eval"
      for name in ${ONLY:-full no-last no-text}; do
        ckpt="$W/runs/$name/checkpoints/step-$(printf %06d "$ABLATION_STEPS")"
        pdengine demo package --run "$W/runs/$name" --checkpoint "$ckpt" --out "$W/eval/$name-$ABLATION_STEPS" --overwrite
        tag=$name-$ABLATION_STEPS${GUIDANCE:+-g$GUIDANCE}
        OMP_NUM_THREADS=$THREADS pdengine eval --model "$W/eval/$name-$ABLATION_STEPS" --data "$W/data" \
          --limit "$ABLATION_EVAL_CLIPS" --steps "$ABLATION_EVAL_STEPS" --tau 0 --tau T --device cpu \
          ${GUIDANCE:+--guidance "$GUIDANCE"} --json "$W/eval/$tag.json" | tee "$W/eval/$tag.md"
      done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
