#!/usr/bin/env bash
# The whole pipeline on the embedded defaults, raw text to report, one stage after another:
#
#     bash pipeline.sh             # CPU: data, pretraining, SFT, DPO, RLHF, evaluation of each, out/report.md
#     OUT=runs/a bash pipeline.sh  # the run folders under another root (the data stays in data/)
#     SEED=1 bash pipeline.sh      # another seed for the post-training stages (SFT, DPO, RLHF)
#
# Each line is the command a reader would type for that stage. Each stage writes a run folder whose
# summary.json appears only when the stage is complete; the next stage and the report read it. A stage
# that fails stops the pipeline (set -e) with its own one-line error, and running the script again skips
# the stages that are complete and starts the failed one afresh.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-out}
SEED=${SEED:-1337}
done_() { [ -f "$OUT/$1/summary.json" ]; }  # the stage's folder is complete

[ -f data/stdlib/meta.json ] || python data.py                                          # cleaned text, BPE, shards
done_ pretrain || python train.py --out-dir "$OUT/pretrain"                             # pretraining
done_ sft  || python sft.py --init "$OUT/pretrain" --out-dir "$OUT/sft" --seed "$SEED"   # SFT on a flawed teacher
done_ dpo  || python dpo.py --init "$OUT/sft" --out-dir "$OUT/dpo" --seed "$SEED"        # pairs judged by the verifier
done_ rlhf || python rlhf.py --init "$OUT/dpo/best" --out-dir "$OUT/rlhf" --seed "$SEED" # RL with the verifier
evaluate() {  # stage, checkpoint folder: evaluation and audits into the stage's eval.json
    if done_ "$1" && [ ! -f "$OUT/$1/eval.json" ]; then python eval.py "$OUT/$2" --out "$OUT/$1/eval.json"; fi
}
evaluate pretrain pretrain
evaluate sft      sft
evaluate dpo      dpo/best                                                              # the step RLHF started from
evaluate rlhf     rlhf
python eval.py --report "$OUT"                                                          # $OUT/report.md
