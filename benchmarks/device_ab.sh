#!/usr/bin/env bash
# One device call's measurements, side by side: the current runtime against an older copy of it (an ignored
# folder holding winaconv_runtime/, e.g. `git archive <commit> runtime`), plus the peers. Each step is cut at
# its own time limit and writes <step>.log (and .json) under $OUT, so a call that runs out keeps what finished.
#   OLD=.old_runtime bash benchmarks/device_ab.sh gen_short gen_old moe_kernels_ab moe_kernels moe teal_kernels peers
#   (MoE decode step at 50%, current against older: moe_step_ab)
#   (batch 4: gen_b4 gen_b4_old)
# The older copy: mkdir .old_runtime && git archive REV runtime | tar -x -C .old_runtime &&
#   mv .old_runtime/runtime .old_runtime/winaconv_runtime (carry .old_runtime and .peers to the device).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/device_ab}
OLD=$(cd "${OLD:-$ROOT/.old_runtime}" 2>/dev/null && pwd)  # absolute: each step runs from benchmarks/
mkdir -p "$OUT" /tmp/device_ab_new
ln -sfn "$ROOT/runtime" /tmp/device_ab_new/winaconv_runtime
export PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
new() { PYTHONPATH=/tmp/device_ab_new:$ROOT:$ROOT/benchmarks "$@"; }
old() { PYTHONPATH=$OLD:$ROOT:$ROOT/benchmarks "$@"; }
step() {  # step NAME SECONDS which COMMAND...
  local name=$1 limit=$2 which=$3
  shift 3
  echo "== $name ($which, limit ${limit}s) $(date +%T)"
  (cd "$ROOT/benchmarks" && $which timeout "$limit" "$@") > "$OUT/$name.log" 2>&1
  echo "   rc $? $(date +%T)"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
for what in "$@"; do
  case $what in
    gen)  # Llama-3-8B config, generate() at batch 1 (a profile at 50%)
      step gen_new 240 new python3 e2e_decode.py generate --batches 1 --levels 0,0.5,0.65 --new-tokens 128 \
        --no-baselines --profile-levels 0.5 --out "$OUT/gen_new.json" ;;
    gen_short)  # the same at 0 and 50% only, no profile (gen_old's levels)
      step gen_short 150 new python3 e2e_decode.py generate --batches 1 --levels 0,0.5 --new-tokens 128 \
        --no-baselines --profile-levels "" --out "$OUT/gen_short.json" ;;
    gen_old)  # gen_short with the older runtime
      step gen_old 130 old python3 e2e_decode.py generate --batches 1 --levels 0,0.5 --new-tokens 128 \
        --no-baselines --profile-levels "" --out "$OUT/gen_old.json" ;;
    gen_b4)  # batch 4 at 0 and 50% (the few-token stacked masked products against gen_b4_old)
      step gen_b4 220 new python3 e2e_decode.py generate --batches 4 --levels 0,0.5 --new-tokens 128 \
        --no-baselines --profile-levels 0,0.5 --out "$OUT/gen_b4.json" ;;
    few_tokens)  # batch 1-8: the masked dense products of a sparse level against level 0's (few_token_products.py)
      step few_tokens 120 new python3 few_token_products.py --json "$OUT/few_tokens.json" ;;
    gen_b4_ab)  # a short A/B at batch 4: 64 new tokens, the current runtime (profile at 50%) then the older copy
      step gen_b4_ab_new 130 new python3 e2e_decode.py generate --batches 4 --levels 0,0.5 --new-tokens 64 \
        --no-baselines --profile-levels 0.5 --out "$OUT/gen_b4_ab_new.json"
      step gen_b4_ab_old 120 old python3 e2e_decode.py generate --batches 4 --levels 0,0.5 --new-tokens 64 \
        --no-baselines --profile-levels "" --out "$OUT/gen_b4_ab_old.json" ;;
    gen_b4_old)
      step gen_b4_old 200 old python3 e2e_decode.py generate --batches 4 --levels 0,0.5 --new-tokens 128 \
        --no-baselines --profile-levels "" --out "$OUT/gen_b4_old.json" ;;
    moe_kernels)  # the grouped expert launches, top-8 of 128 (2048 -> 2x768, 768 -> 2048)
      step moe_kernels_new 280 new python3 moe_decode.py kernels --levels 0.5,0,0.65,0.25,0.8 \
        --json "$OUT/moe_kernels_new.json" ;;
    moe_kernels_ab)  # the default tiles alone at 0 and 50%, current runtime then the older copy (a short A/B)
      step moe_kernels_ab_new 100 new python3 moe_decode.py kernels --candidates default --levels 0,0.5 \
        --json "$OUT/moe_kernels_ab_new.json"
      step moe_kernels_ab_old 100 old python3 moe_decode.py kernels --candidates default --levels 0,0.5 \
        --json "$OUT/moe_kernels_ab_old.json" ;;
    moe_kernels_old)
      step moe_kernels_old 150 old python3 moe_decode.py kernels --json "$OUT/moe_kernels_old.json" ;;
    moe_half)  # Qwen3-30B-A3B config, 50% alone with its profile and dynamo's recompile log
      step moe_half_new 200 new env TORCH_LOGS=recompiles,graph_breaks python3 moe_decode.py gpu --no-baselines \
        --levels 0.5 --profile-levels 0.5 --tokens 32 --repeats 3 --json "$OUT/moe_half_new.json" ;;
    moe)  # Qwen3-30B-A3B config, generate() and the decode step alone at 0, 50 and 65%
      step moe_new 240 new python3 moe_decode.py gpu --no-baselines --levels 0,0.5,0.65 --profile-levels 0,0.5 \
        --tokens 32 --repeats 3 --json "$OUT/moe_new.json" ;;
    moe_best)  # `moe` with the tiles that won moe_kernels at 50%, each launch's own (run moe_kernels first in the same call)
      tiles=($(python3 -c "import json, sys; found = json.load(open(sys.argv[1]))
best = lambda key: min(found[key], key=found[key].get)
if 'down_ms_0.5' in found:
    print(best('gate_up_ms_0.5'), best('down_ms_0.5'))
else:
    print(best('grouped_ms_0.5'))" "$OUT/moe_kernels_new.json" 2>/dev/null))
      echo "   moe_kernels' best tiles at 50% (gate/up, down): ${tiles[*]:-none found}"
      args=()
      [ -n "${tiles[0]:-}" ] && args+=(--tiles "${tiles[0]}")
      [ -n "${tiles[1]:-}" ] && args+=(--down-tiles "${tiles[1]}")
      step moe_best 240 new python3 moe_decode.py gpu --no-baselines --levels 0.5,0,0.65 --profile-levels 0.5 \
        --tokens 32 --repeats 3 "${args[@]}" --json "$OUT/moe_best.json" ;;
    moe_short)  # the same at 0 and 50% only, a profile at 50%
      step moe_short 200 new python3 moe_decode.py gpu --no-baselines --levels 0,0.5 --profile-levels 0.5 \
        --tokens 32 --repeats 3 --json "$OUT/moe_short.json" ;;
    moe_step_ab)  # 50% alone, the current runtime then the older copy (a short A/B of the decode step)
      step moe_step_ab_new 140 new python3 moe_decode.py gpu --no-baselines --levels 0.5 --tokens 32 --repeats 3 \
        --json "$OUT/moe_step_ab_new.json"
      step moe_step_ab_old 140 old python3 moe_decode.py gpu --no-baselines --levels 0.5 --tokens 32 --repeats 3 \
        --json "$OUT/moe_step_ab_old.json" ;;
    moe_old)
      step moe_old 150 old python3 moe_decode.py gpu --no-baselines --levels 0,0.5 --tokens 32 --repeats 3 \
        --json "$OUT/moe_old.json" ;;
    teal_kernels)  # kernel table at batch 1 beside TEAL's public kernel (.peers/teal)
      step kernel_teal 200 new python3 kernel_bench.py --quick-check --skip-check --candidates t64x512w4,L128r32g4s3f \
        --batches 1 --out "$OUT/kernel_teal.txt" ;;
    batch_kernels)  # batch 2-8: the tensor-core tile candidates against cuBLAS (quick GPU check first)
      step kernel_batch 240 new python3 kernel_bench.py --quick-check --skip-check --sweep --batches 2,4,8 \
        --out "$OUT/kernel_batch.txt" ;;
    peers)  # TEAL's gpt-fast, dense and with TEAL's kernels at 50% (.peers/teal)
      step peers 240 new python3 peer_gpt_fast.py --levels 0,0.5 --new-tokens 128 --json "$OUT/peers.json" ;;
    *) echo "unknown step $what" ;;
  esac
done
