# Two commands do all set-up on a fresh machine:
#   make demo   create .venv if missing, install vitpipe, run the demo recipe end to end
#   make test   create .venv if missing, install vitpipe with test extras, run the tests
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned; pip picks the CPU build where one is on the machine's index/disk and the
# normal CUDA build on machines with GPUs. No torchvision, no timm.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'" >&2; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	DS_ACCELERATOR=$${DS_ACCELERATOR:-$$($(PY) -c "import torch;print('cuda' if torch.cuda.is_available() else 'cpu')")} \
	  $(VENV)/bin/vitpipe run configs/pipeline/demo.yaml $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs mlruns mlflow.db .pytest_cache
