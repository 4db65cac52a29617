# edgeopt — set-up, tests and device deployment.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# The CPU build of torch lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN = torch==2.13.0
# ExecuTorch (format pte) is tied to the torch it was built for; the op library to both.
EXECUTORCH_PIN = executorch==1.4.*

.PHONY: setup test lint clean regress-update

setup:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[dev,pte]' $(TORCH_PIN) '$(EXECUTORCH_PIN)'
	$(PY) -c "import torch, importlib.metadata as m; t, e = torch.__version__, m.version('executorch'); \
	assert t.startswith('2.13.0') and e.startswith('1.4.'), f'pin broken: torch {t}, executorch {e}'; print('torch', t, 'executorch', e)"
	$(PY) -m edgeopt.ops.build_kernels

test:
	$(VENV)/bin/ruff check edgeopt tests benchmarks
	$(PY) -m pytest -q
	$(VENV)/bin/edgeopt regress

regress-update:
	$(VENV)/bin/edgeopt regress --update

lint:
	$(VENV)/bin/ruff check edgeopt tests benchmarks

clean:
	rm -rf runs .pytest_cache

# Device deployment: make deploy|profile DEVICE=name RUN=runs/..., make profile-all RUN=runs/...
include devices/deploy.mk
