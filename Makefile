# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
#   make train [CONFIG=configs/....yaml] [ARGS="--trainer.max_steps=100 ..."]
#   make test | make lint | make install | make clean
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/sinusoid/maml.yaml
ARGS ?=
# torch is installed before the project so the project's `torch>=2.2` is already satisfied
# and pip never fetches a (multi-GB, CUDA) torch of its own choosing. When $(PYTHON) already
# has torch, the venv sees it (--system-site-packages) and it is kept as it is.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "keeping the torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@$(PY) -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, '| lightning', pl.__version__)"
	@touch $@

train: $(STAMP)
	$(VENV)/bin/lightning-meta fit --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache logs wandb lightning_logs
