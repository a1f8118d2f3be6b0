"""The CPU kernels' narrower SIMD paths give what their widest paths give.

Where the CPU has AVX-512 (F, BW) or AVX2 the kernels take it (csrc/cpu/cpu_features.h), so the
narrower paths would go untested here: the AVX2 packing, sums and neuron on an AVX-512 machine, the
SSE2 packing and the GCC-vector sums of the attention kernels on an AVX2 one, and SSA's AVX-512
paths without VPOPCNTDQ / VBMI / GFNI (K^T V as sums of V rows, scalar bit transposes) on a machine
with them. With SPIKEOPS_NO_AVX512_BITOPS=1 the extension takes the latter, with SPIKEOPS_NO_AVX512=1
the AVX2 paths, with SPIKEOPS_NO_AVX2=1 the baseline ones; this file runs the C++ tests of
packing, spike_matmul, the Spike* layers, SSA, token attention, batch_norm_lif, max pooling and the
LIF again in such processes. The loops of csrc/cpu/simd_variants.h pick their variant (x86-64-v4,
AVX2, baseline x86-64) by these switches too: the LIF steps, BatchNorm's sums and input gradient,
counts, bf16 staging, channels-last max pooling, unpacking, spike_matmul's popcounts, and SSA's
and token attention's GCC-vector loops.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

C = pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_pack.py", "tests/test_spike_matmul.py", "tests/test_spike_layers.py", "tests/test_ssa.py",
              "tests/test_token_attention.py", "tests/test_batch_norm_lif.py", "tests/test_max_pool.py", "tests/test_lif.py"]
SWITCHES = {"SPIKEOPS_NO_AVX2": "avx2_enabled", "SPIKEOPS_NO_AVX512": "avx512_enabled",
            "SPIKEOPS_NO_AVX512_BITOPS": "avx512_bitops_enabled"}


def run_python(args, switch: str = "", on: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, **{name: "0" for name in SWITCHES})
    if switch:
        env[switch] = "1" if on else "0"
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def enabled(switch: str = "") -> tuple[bool, ...]:
    """(avx2_enabled, avx512_enabled, avx512_bitops_enabled) in a process with `switch` set."""
    probe = ["-c", "import spikeops._C as C; print(C.avx2_enabled(), C.avx512_enabled(), C.avx512_bitops_enabled())"]
    return tuple(word == "True" for word in run_python(probe, switch).stdout.split())


def test_the_switches_reach_the_extension():
    here = (C.avx2_enabled(), C.avx512_enabled(), C.avx512_bitops_enabled())
    assert enabled() == here
    assert enabled("SPIKEOPS_NO_AVX2") == (False, False, False)  # no AVX-512 paths without the AVX2 ones
    assert enabled("SPIKEOPS_NO_AVX512") == (here[0], False, False)
    assert enabled("SPIKEOPS_NO_AVX512_BITOPS") == (*here[:2], False)


# the switches of the paths this CPU takes (where a path is off, the other tests run the narrower one)
@pytest.mark.parametrize("switch", [name for name, enabled in SWITCHES.items() if getattr(C, enabled)()])
def test_kernel_tests_pass_on_the_narrower_paths(switch):
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp and not opcheck and not compile", *TEST_FILES]
    result = run_python(args, switch)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
