#!/usr/bin/env bash
# Whole-model check on a GPU machine: every GPU test, then DefMamba-T/S/B next to the timm peers
# (eager), compiled inference with CUDA graphs, eager steps recorded into CUDA graphs (inference and
# training, next to the peers; plotted as images/s against memory), eager training with DefMamba's
# forward and backward replayed from graphs (--graphed-training), the sampling-op and
# depthwise-conv A/Bs and a profile of DefMamba-S.
# Usage (from the repository root, the scan extension installed):
#   bash tools/device/model_check.sh [OUT_DIR]
# Writes env.log, tests.log, compile_workaround.log, eager.{log,json}, compiled.{log,json}, graphs.{log,json},
# graphed_training.{log,json},
# throughput_vs_memory.png (graphs.json plotted), sampling.{log,json} (the sampling op against its
# PyTorch formulation), dwconv.{log,json} (the Triton depthwise convs against cuDNN) and
# profile_small.{log,json}
# into OUT_DIR (default: $OUT, else ./output/model). PYTEST_ARGS: more arguments for the GPU tests
# (e.g. "-n 8" with pytest-xdist). With 8 workers the suite takes more than one ten-minute call on an
# H100 (its torch.compile tests alone take minutes): tools/device/gpu_suite.sh runs it in two parts.
set -o pipefail
out="${1:-${OUT:-output/model}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.log"
python3 -c "from defmamba.ops.selective_scan import available_backends as a; print('backends', a('cuda'))" | tee -a "$out/env.log"
python3 -m pytest -q -rfxX -p no:cacheprovider -m cuda ${PYTEST_ARGS:-} tests/ 2>&1 | tee "$out/tests.log" | tail -15
tests_rc=$?
# The whole-model compiled-training check (a known defect, strict xfail) once more, run as a plain
# test with the two Inductor settings around the failing assertion off: loop reindexing (the
# workaround pytorch/pytorch#197077 names) and the coalescing tiling analysis that calls it.
TORCHINDUCTOR_LOOP_REINDEXING_AFTER_FUSION=0 TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0 python3 -m pytest -q -rf --runxfail -p no:cacheprovider -m cuda \
    tests/test_compile.py -k model_training 2>&1 | tee "$out/compile_workaround.log" | tail -5
bench=(python3 tools/benchmark.py --warmup 3 --repeats 5 --iters 3)
"${bench[@]}" --modes infer_fp32 infer_fp16 infer_bf16 train_fp16 train_bf16 --json "$out/eager.json" 2>&1 \
    | tee "$out/eager.log" | tail -12
"${bench[@]}" --compile reduce-overhead --peers --modes infer_fp32 infer_fp16 infer_bf16 --json "$out/compiled.json" 2>&1 \
    | tee "$out/compiled.log" | tail -6
"${bench[@]}" --cuda-graphs --modes infer_fp16 train_fp16 train_bf16 --json "$out/graphs.json" 2>&1 \
    | tee "$out/graphs.log" | tail -10
# the eager loop with only DefMamba's forward and backward replayed (model.set_graphed_training());
# the peers' eager numbers are in eager.json
"${bench[@]}" --graphed-training --peers --modes train_fp16 train_bf16 --json "$out/graphed_training.json" 2>&1 \
    | tee "$out/graphed_training.log" | tail -6
python3 tools/plot_benchmarks.py "$out/graphs.json" --date "$(date +%F)" --out "$out/throughput_vs_memory.png" 2>&1 \
    | tail -1
python3 tools/benchmark_sampling.py --models defmamba_small --json "$out/sampling.json" 2>&1 \
    | tee "$out/sampling.log" | tail -6
python3 tools/benchmark_depthwise_conv.py --models defmamba_small --whole-model train_bf16 infer_fp16 \
    --warmup 3 --repeats 5 --iters 3 --json "$out/dwconv.json" 2>&1 | tee "$out/dwconv.log" | tail -4
python3 tools/profile_model.py --model defmamba_small --batch-size 128 --amp float16 --out "$out/profile_small.json" \
    > "$out/profile_small.log" 2>&1
echo "tests rc=$tests_rc"
exit "$tests_rc"
