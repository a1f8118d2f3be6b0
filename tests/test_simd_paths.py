"""The CPU kernels' baseline paths give what their AVX2 paths give.

Where the CPU has AVX2 the kernels take it (csrc/cpu/cpu_features.h), so the SSE2 packing and the
GCC-vector sums of the attention kernels would go untested here. With SPIKEOPS_NO_AVX2=1 the
extension takes the baseline paths; this file runs the C++ tests of packing, the Spike* layers, SSA
and token attention again in such a process.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

C = pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")

ROOT = Path(__file__).resolve().parent.parent
TEST_FILES = ["tests/test_pack.py", "tests/test_spike_layers.py", "tests/test_ssa.py", "tests/test_token_attention.py"]


def run_python(args, no_avx2: bool) -> subprocess.CompletedProcess:
    env = dict(os.environ, SPIKEOPS_NO_AVX2="1" if no_avx2 else "0")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_the_switch_reaches_the_extension():
    probe = ["-c", "import spikeops._C as C; print(C.avx2_enabled())"]
    assert run_python(probe, no_avx2=True).stdout.strip() == "False"
    assert run_python(probe, no_avx2=False).stdout.strip() == str(C.avx2_enabled())


@pytest.mark.skipif(not C.avx2_enabled(), reason="no AVX2 here: the other tests already run the baseline paths")
def test_kernel_tests_pass_on_the_baseline_paths():
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cpp and not opcheck and not compile", *TEST_FILES]
    result = run_python(args, no_avx2=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
