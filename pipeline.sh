#!/usr/bin/env bash
# The whole pipeline on the embedded defaults, raw text to report, one stage after another:
#
#     bash pipeline.sh             # CPU: data, pretraining, SFT, DPO, RLHF, evaluation of each, out/report.md
#     OUT=runs/a bash pipeline.sh  # the run folders under another root (the data stays in data/)
#
# Each line is the command a reader would type for that stage. Each stage writes a run folder whose
# summary.json appears only when the stage is complete; the next stage and the report read it. A stage
# that fails stops the pipeline (set -e) with its own one-line error, and running the script again skips
# the stages that are complete and starts the failed one afresh.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
done_() { [ -f "$OUT/$1/summary.json" ]; }  # the stage's folder is complete

[ -f data/stdlib/meta.json ] || python data.py                                          # cleaned text, BPE, shards
done_ pretrain || python train.py --out-dir "$OUT/pretrain"                             # pretraining
done_ sft      || python sft.py --init "$OUT/pretrain" --out-dir "$OUT/sft"             # supervised fine-tuning
done_ dpo      || python dpo.py --init "$OUT/sft" --out-dir "$OUT/dpo"                  # preference pairs, offline
done_ rlhf     || python rlhf.py --init "$OUT/dpo/best" --out-dir "$OUT/rlhf"          # RL with a verifier
evaluate() {  # stage, checkpoint folder: evaluation and audits into the stage's eval.json
    if done_ "$1" && [ ! -f "$OUT/$1/eval.json" ]; then python eval.py "$OUT/$2" --out "$OUT/$1/eval.json"; fi
}
evaluate pretrain pretrain
evaluate sft      sft
evaluate dpo      dpo/best                                                              # the step RLHF started from
evaluate rlhf     rlhf
python eval.py --report "$OUT"                                                          # $OUT/report.md
