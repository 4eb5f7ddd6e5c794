#!/usr/bin/env bash
# The speed targets of issue "Speed", checked in one run on an idle machine (about 55 min on one CPU core):
# the subsets of speed_shapes.py's full sweep (~15 h) that the targets name, then the measure choice.
#
#   bash benchmarks/speed_acceptance.sh            # from the repository root
#   TABLES=/path/to/tables bash benchmarks/speed_acceptance.sh
#
# TABLES holds the default model's loss tables <task>_<measure>.npz for cnndm/squad x softmax, softmax_shortlist,
# saturation, meta, collected as examples/calibrate_default_model.sh does with --measure <measure>.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
TABLES=${TABLES:-benchmarks/results/measure_choice_tables}
run() { echo "+ $*" >&2; "$@"; }

# λ = 1 at batch 1 and 8; at batch 1, forced exits at L/4, L/2, 3L/4 with every measure's real cost (targets: shortlist at
# L/2 <= 0.90x, at L/4 <= 0.75x; the default at L/2 <= 0.85x; λ = 1 <= 1.02x)
run python benchmarks/speed_shapes.py --shapes base --batch-sizes 1 8 --sweep-batch-sizes 1 --input-lengths 128 \
    --exit-layers 3 6 9 --mixed-lengths --out "$OUT/speed_shapes_base.json"
# t5-small: the same, plus the mixed batch (8 rows at different layers every step, 256 input tokens; target
# <= 0.90x at every length, not growing with it). 5 interleaved pairs instead of 3: at batch 8 HF's own time per
# token varies by ±10% between its runs here, and the median of 5 paired ratios is the steadier estimate
run python benchmarks/speed_shapes.py --shapes small --batch-sizes 1 8 --sweep-batch-sizes 1 --input-lengths 128 \
    --exit-layers 2 3 5 --mixed-lengths 32 128 256 --repeats 5 --out "$OUT/speed_shapes_small.json"
# flan-t5-large: λ = 1 at batch 1 and 8, exits at 6 and 12 of 24, the RC paper's operating point (mean exit 6)
run python benchmarks/speed_shapes.py --shapes large --batch-sizes 1 8 --sweep-batch-sizes 1 --input-lengths 128 \
    --exit-layers 6 12 --mixed-lengths --out "$OUT/speed_shapes_large.json"
# the default measure: calibrated exit layers at ε = 0.05 (CRC, UCB) on both tasks, timed on the three shapes
tables=()
for task in cnndm squad; do
  for measure in softmax softmax_shortlist saturation meta; do
    tables+=(--table "$task" "$measure" "$TABLES/${task}_${measure}.npz")
  done
done
run python benchmarks/measure_choice.py "${tables[@]}" --out "$OUT/measure_choice.json"
