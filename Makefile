# edgeopt — set-up, tests and device deployment.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# The CPU build of torch lies on this disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH_PIN = torch==2.13.0
# ExecuTorch (format pte) is tied to the torch it was built for; the op library to both.
EXECUTORCH_PIN = executorch==1.4.*

.PHONY: setup test lint clean regress-update emulated-rpi5 emulated-rpi5-stop test-board

setup:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e '.[dev,pte]' $(TORCH_PIN) '$(EXECUTORCH_PIN)'
	$(PY) -c "import torch, importlib.metadata as m; t, e = torch.__version__, m.version('executorch'); \
	assert t.startswith('2.13.0') and e.startswith('1.4.'), f'pin broken: torch {t}, executorch {e}'; print('torch', t, 'executorch', e)"
	$(PY) -m edgeopt.ops.build_kernels

test: test-board
	$(VENV)/bin/ruff check edgeopt tests benchmarks
	$(PY) -m pytest -q
	$(VENV)/bin/edgeopt regress

regress-update:
	$(VENV)/bin/edgeopt regress --update

# An emulated Raspberry Pi 5 (arm64 root under qemu-user, cached in /var/cache/edgeopt) reached over ssh.
emulated-rpi5:
	devices/emulated-rpi5.sh up

emulated-rpi5-stop:
	devices/emulated-rpi5.sh stop

# `make test` starts the board where this host can (root, binfmt_misc) and its tests skip where it
# cannot (exit 2); in CI (CI=true) a board that cannot run fails, and so does any failed build.
test-board:
	@devices/emulated-rpi5.sh up || { rc=$$?; \
	  if [ $$rc = 2 ] && [ "$${CI:-}" != true ]; then echo "emulated board unavailable here: its tests skip"; \
	  else exit $$rc; fi; }

lint:
	$(VENV)/bin/ruff check edgeopt tests benchmarks

clean:
	rm -rf runs .pytest_cache

# Device deployment: make deploy|profile DEVICE=name RUN=runs/..., make profile-all RUN=runs/...
include devices/deploy.mk
