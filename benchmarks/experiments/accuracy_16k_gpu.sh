#!/usr/bin/env bash
# The accuracy study at the converter's default budget (16,384 calibration tokens, greedy on 2,048) and the
# loss probe, on the lent GPU (float32 throughout, as on the CPU). Run from the repo root after
# device_assets.sh; stages resume (checkpoints and the JSON stay in /tmp/acc-16k while the machine is held).
#   bash benchmarks/experiments/accuracy_16k_gpu.sh study  LABELS [EVAL_TOKENS]   # rows of accuracy_study.py
#   bash benchmarks/experiments/accuracy_16k_gpu.sh probe  LEVEL                  # accuracy_probe.py on WINA pca
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
work=/tmp/acc-16k out=${OUT:-/tmp/out}
mkdir -p $work $out
case $1 in
  study)
    tokens=${3:-4096}
    python3 benchmarks/accuracy_study.py --device cuda --calib-tokens 16384 --greedy-tokens 2048 --check-dense \
      --eval-tokens $tokens --only "$2" --work $work \
      --out $work/accuracy_pca_16k_eval$tokens.json --md $work/accuracy_pca_16k_eval$tokens.md
    cp $work/accuracy_pca_16k_eval$tokens.* $out/ ;;
  probe)
    python3 benchmarks/experiments/accuracy_probe.py $work/wina-pca-paper-c16384-s512-g2048-step0.025 \
      --level $2 --device cuda --eval-tokens 0 --max-samples 16384 --out $out/accuracy_probe_$2.json ;;
esac
