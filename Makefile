# The commands the README documents. Python is whatever `python3` is on PATH.
PYTHON ?= python3

.PHONY: install demo demo-quick demo-grounding test test-system test-all lint

install:  ## CPU install: the pinned CPU torch first (a plain `torch` pulls a multi-GB CUDA build)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev]"

demo: install  ## synthetic corpus -> shards -> DeepSpeed pre-training with and without vision on CPU -> summary (~10 min on 2 cores; grounding shows)
	$(PYTHON) -m lxtrain.demo

demo-quick: install  ## the former default: a harder world at BERT's init, 340 steps (~6 min on 2 cores; no grounding yet)
	$(PYTHON) -m lxtrain.demo --setting quick

demo-grounding: install  ## the grounding setting: ~5,200 steps in an easier world, where QA and object-word grounding show (~60 min on 2 cores)
	$(PYTHON) -m lxtrain.demo --setting grounding

test:  ## fast feedback: unit tests, parity, in-process checks (no launched processes, no Inductor builds)
	$(PYTHON) -m pytest -q -m "not slow and not gpu and not multiproc and not inductor"

test-system:  ## launched runs (deepspeed/mpirun/gloo ranks, Slurm when .ci/slurm_cluster.sh started it, faults) and Inductor builds
	$(PYTHON) -m pytest -q -m "(multiproc or inductor) and not slow and not gpu"

test-all:  ## everything, the full-size checks included
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check lxtrain tests bench slurm
	$(PYTHON) -m ruff format --check lxtrain tests bench
