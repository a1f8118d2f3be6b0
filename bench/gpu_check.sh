#!/usr/bin/env bash
# One call on a lent GPU machine: the Triton tests on the GPU, then every benchmark on CUDA.
#
#   bash bench/gpu_check.sh            (OUT=dir for logs and results; default /tmp/spikeops_gpu)
#
# Uses the machine's own python3/torch/triton and the source tree as is (no build by default: the
# C++ kernels are for CPU tensors and are tested on CPU; CPP_S=SECONDS builds them there with its
# torch and runs the C++ tests on its CPU, another x86-64 model than the CI machine's).
# SpikingJelly and loguru, when not installed there, are read from .gpu/site (copy them there from
# a venv; .gpu/ is git-ignored locally and carried to the device). Each step has its own time
# limit (seconds, overridable: TEST_S, BENCH_S; TEST_S="" runs no Triton tests, BENCH_S="" no
# bench) so that one slow or failing step leaves the others their time; everything is logged
# under $OUT, and bench/results/ is archived there as results.tgz.
# BENCH_S may also name inference (bench_inference). AMP_S="bf16:150" (default none) adds the
# training step under autocast (bench_train_step --amp bf16, all CUDA cases). PROFILE_S="cifar:80"
# (default none) adds bench.profile_train_step for that case (spikeops and SpikingJelly builds: step
# time, kernel time, host syncs, top kernels) into $OUT/profile_<case>.txt.
set -u
OUT=${OUT:-/tmp/spikeops_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.gpu/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# spikeops.models is the top-level models/ folder (setup.py's package_dir): link it for the bare tree
[ -e spikeops/models ] || ln -s ../models spikeops/models
TEST_S=${TEST_S-160}
BENCH_S=${BENCH_S-"ssa:60 host:30 token_attention:60 train_step:150 lif:75 masked_conv:45"}
REPEATS=${REPEATS:-20}
AMP_S=${AMP_S-""}
PROFILE_S=${PROFILE_S-""}
CPP_S=${CPP_S-""}

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import spikingjelly, spikeops.backend as b; print('spikingjelly ok; cpp built:', b.cpp_available())"
} 2>&1 | tee "$OUT/env.txt"

# Every test parametrised with the Triton backend runs on CUDA tensors here (tests/harness.py).
XDIST=""
python3 -c "import xdist" 2>/dev/null && XDIST="-n 12"
if [ -n "$TEST_S" ]; then
  timeout -s INT -k 15 "$TEST_S" python3 -m pytest -q -rfE --tb=short -k triton $XDIST -p no:cacheprovider tests >"$OUT/tests.log" 2>&1
  echo "tests: exit $? (124 = interrupted at ${TEST_S}s)" | tee -a "$OUT/env.txt"
  tail -n 25 "$OUT/tests.log"
fi

if [ -n "$CPP_S" ]; then
  export SPIKEOPS_XDIST=$XDIST SPIKEOPS_OUT=$OUT
  timeout -s INT -k 15 "$CPP_S" bash -c 'grep -m1 "model name" /proc/cpuinfo; grep -o -w "avx2\|avx512f\|bmi1" /proc/cpuinfo | sort -u | tr "\n" " "; echo
    MAX_JOBS=16 python3 setup.py build_ext --inplace >"$SPIKEOPS_OUT/cpp_build.log" 2>&1 || { tail -n 30 "$SPIKEOPS_OUT/cpp_build.log"; exit 3; }
    python3 -c "import spikeops._C as C; print(\"cpp built; avx2 path:\", C.avx2_enabled())"
    python3 -m pytest -q -rfE --tb=short -k "cpp or simd_paths" $SPIKEOPS_XDIST -p no:cacheprovider tests/test_pack.py tests/test_spike_matmul.py tests/test_ssa.py tests/test_token_attention.py tests/test_lif.py tests/test_spike_layers.py tests/test_simd_paths.py tests/test_max_pool.py tests/test_batch_norm_lif.py tests/test_known_counts.py >"$SPIKEOPS_OUT/cpp_tests.log" 2>&1' 2>&1 | tee -a "$OUT/env.txt"
  echo "cpp build + tests: exit ${PIPESTATUS[0]} (124 = interrupted at ${CPP_S}s)" | tee -a "$OUT/env.txt"
  tail -n 15 "$OUT/cpp_tests.log" 2>/dev/null
fi

# bench_step LABEL LIMIT_S COMMAND...: one benchmark under its own time limit, logged
bench_step() {
  local label=$1 limit=$2
  shift 2
  echo "# $label (limit ${limit}s)" | tee -a "$OUT/bench.log"
  timeout "$limit" "$@" >>"$OUT/bench.log" 2>&1
  echo "$label: exit $?" | tee -a "$OUT/env.txt" "$OUT/bench.log"
}
for spec in $BENCH_S; do
  bench_step "bench_${spec%%:*}" "${spec##*:}" python3 -m bench.run --device cuda --only "${spec%%:*}" --repeats "$REPEATS"
done
for spec in $AMP_S; do
  bench_step "bench_train_step --amp ${spec%%:*}" "${spec##*:}" \
    python3 -m bench.bench_train_step --device cuda --amp "${spec%%:*}" --repeats "$REPEATS"
done
for spec in $PROFILE_S; do
  echo "# profile_train_step --case ${spec%%:*} (limit ${spec##*:}s)" | tee -a "$OUT/env.txt"
  timeout "${spec##*:}" python3 -m bench.profile_train_step --case "${spec%%:*}" --device cuda \
    --builds spikeops,spikingjelly --top 12 >"$OUT/profile_${spec%%:*}.txt" 2>&1
  echo "profile_train_step ${spec%%:*}: exit $?" | tee -a "$OUT/env.txt"
  grep "^### " "$OUT/profile_${spec%%:*}.txt"
done
tar czf "$OUT/results.tgz" bench/results 2>/dev/null
[ -f "$OUT/bench.log" ] && grep -v "^ *[a-z_]*: .* on cuda \.\.\.$" "$OUT/bench.log" | tail -n 60
