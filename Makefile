# spikeops: `make setup` then `make test`. Everything goes into the project-local .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: setup test bench build clean train

setup: $(VENV)/.deps
	$(MAKE) build

# torch is pinned to the CPU build (requirements-cpu.txt); SpikingJelly is installed without
# its dependencies so that it cannot pull a CUDA torch in.
$(VENV)/.deps: requirements-cpu.txt requirements-bench.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -r requirements-cpu.txt -r requirements-bench.txt
	$(PIP) install -q --no-deps spikingjelly==2.0.0
	touch $@

build:
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import spikeops._C" || (echo "spikeops._C built but does not import (see above)" && exit 1)

test:
	$(PY) -m pytest -q tests

bench:
	$(PY) -m bench.run

# Train Spikformer (CIFAR 4-256) on the bundled handwritten digits (no download), at 16x16 and
# T=2 so that it takes a few minutes on 2 CPU cores (~97% test accuracy). Writes runs/digits/.
# Options: python -m spikeops.train --help (CIFAR, ImageFolder, recipes, torchrun, pretrain).
train:
	$(PY) -m spikeops.train --model spikformer_cifar_4_256 --dataset digits --img-size 16 --T 2 \
		--batch-size 32 --epochs 3 --lr 1e-3 --warmup-epochs 0.3 --out runs/digits

clean:
	rm -rf build *.egg-info spikeops/_C*.so $(VENV)
