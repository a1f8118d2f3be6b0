"""Build spikeops: the Python package plus the C++ CPU extension ``spikeops._C``.

Build against the torch that is already installed (``pip install -e . --no-build-isolation``).
The CPU kernels are compiled for baseline x86-64 (no ``-march=native``) and pick wider SIMD at
run time (GCC function multiversioning), so one build runs on any x86-64 machine.
"""
import glob
import os

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - explained to the user
    raise SystemExit(
        "spikeops builds against an installed torch: install torch first, then run "
        "`pip install -e . --no-build-isolation` (or `make setup`)."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))

cxx_flags = [
    "-O3",
    "-std=c++17",
    "-fopenmp",
    # Spikes must equal the reference bit for bit: no FMA contraction, no fast-math.
    "-ffp-contract=off",
    "-fno-fast-math",
    # FP exceptions are never inspected; without this GCC will not if-convert float compares,
    # which keeps the surrogate/clamp loops scalar. Results are unchanged.
    "-fno-trapping-math",
]

ext_modules = [
    CppExtension(
        name="spikeops._C",
        sources=sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )
]

setup(
    name="spikeops",
    version="0.1.0",
    description="Fused kernels for spiking vision transformers (LIF, spike attention, masked conv)",
    packages=["spikeops", "spikeops.ops", "spikeops.triton", "spikeops.nn", "spikeops.models", "spikeops.train"],
    package_dir={"spikeops.models": "models"},
    # the training CLI's bundled dataset (scikit-learn's copy of the UCI handwritten digits)
    package_data={"spikeops.train": ["data/digits.csv.gz"]},
    entry_points={"console_scripts": ["spikeops-train=spikeops.train.cli:main"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.5", "numpy", "tqdm"],
    extras_require={"triton": ["triton>=3.2"], "bench": ["spikingjelly==2.0.0"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
