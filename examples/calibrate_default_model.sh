#!/usr/bin/env bash
# Calibrate the shipped default model on the held-out pool, with the CLI only, and write the
# guarantee into its model card: what `hf-safe-exit demo` and `RiskControlled(eps=...)` run under.
#
#   bash examples/calibrate_default_model.sh                 # from the repository root, offline
#   MODEL=/path/to/t5 WORK=/tmp/cal bash examples/calibrate_default_model.sh
#
# Per task (CNN/DM: pool rows 500-899; SQuAD: pool articles 36-47; never trained on):
#   collect   -> every example decoded at every threshold of the grid (losses vs the full model);
#                pool rows listed in the model's selection_eval_ids.json (used to choose it) are left out
#   calibrate -> λ̂ for ε (UCB-WSR, δ = 0.1) on all collected pool examples -> calibration/<task>/
#                (risk_control.json and the loss table, from which RiskControlled(eps, task=...) fits any ε)
#   evaluate  -> repeated random calibration/test splits of the same examples: test risk, speed-up
#   plot, card -> figures (hf_safe_exit_plots/<task>/) and the guarantee section of the model's README.md
# Lengths are the ones the default model was trained with (160 input tokens); the guarantee
# holds for outputs decoded the same way (RiskControlled.generation_settings, used by the demo).
#
# Re-render only the plots and the guarantee sections from the files already in calibration/<task>/
# (no collect, calibrate or evaluate; the calibration files are left as they are):
#
#   CARD_ONLY=1 bash examples/calibrate_default_model.sh
#
# HARDWARE names where collect measured the times (default: this machine when collecting, unstated with
# CARD_ONLY unless the loss table records it).
set -euo pipefail

MODEL=${MODEL:-hf_safe_exit/default_model}
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/hf_safe_exit_calibration}
DELTA=${DELTA:-0.1}
GRID=${GRID:-0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1}
mkdir -p "$WORK"
# pool rows that were used to choose the model (its card's selection_eval_ids.json) never calibrate it
EXCLUDE=()
if [[ -f "$MODEL/selection_eval_ids.json" ]]; then
  EXCLUDE=(--exclude-ids "$MODEL/selection_eval_ids.json")
fi
HARDWARE=${HARDWARE-$([[ -n "${CARD_ONLY:-}" ]] || echo auto)}

# task  examples  max_new_tokens  eps
while read -r task n new_tokens eps; do
  out="$MODEL/calibration/$task"
  mkdir -p "$out"
  if [[ -z "${CARD_ONLY:-}" ]]; then
    hf-safe-exit collect --model "$MODEL" --task "$task" --data "$DATA" --split pool --n "$n" "${EXCLUDE[@]}" \
        --lambdas "$GRID" --max-new-tokens "$new_tokens" --max-input-length 160 --batch-size 8 \
        --output "$WORK/$task.npz" --no-progress --overwrite
    # this recipe regenerates the shipped calibrations: it replaces them deliberately
    hf-safe-exit calibrate --results "$WORK/$task.npz" --eps "$eps" --delta "$DELTA" --method ucb \
        --model "$MODEL" --store-in-model --overwrite
    hf-safe-exit evaluate --results "$WORK/$task.npz" --eps "0.02,0.05,0.1,0.15,0.2" --delta "$DELTA" \
        --repeats 200 --output "$out/evaluation.json" --overwrite
  fi
  # the figures go where the card shows them; the card reads the loss table stored in $out (the rows it was
  # collected on, what λ̂ does against the full model) and refuses to replace any file there with other content
  hf-safe-exit plot --evaluation "$out/evaluation.json" --output-dir "$MODEL/hf_safe_exit_plots/$task"
  hf-safe-exit card --model "$MODEL" --calibration "$out" --evaluation "$out/evaluation.json" \
      --plots "$MODEL/hf_safe_exit_plots/$task"/*.png ${HARDWARE:+--hardware "$HARDWARE"}
done <<EOF
cnndm ${N_CNNDM:-200} 64 ${EPS_CNNDM:-0.05}
squad ${N_SQUAD:-600} 16 ${EPS_SQUAD:-0.05}
EOF
