# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
#   make train [CONFIG=configs/....yaml] [ARGS="--trainer.max_steps=100 ..."]
#   make sweep [CONFIG=...] [SPACE=configs/sweeps/....yaml] [SWEEP_ARGS="--num-samples 20 -- --trainer.max_steps=600"]
#   make test | make lint | make install | make clean
PYTHON ?= python3
VENV ?= .venv
CONFIG ?= configs/sinusoid/maml.yaml
ARGS ?=
SPACE ?= configs/sweeps/maml_lrs.yaml
SWEEP_ARGS ?= --num-samples 16
# Ray probes a cloud metadata address on every start, even with usage stats off (shared/STACK.md),
# so tests and sweeps run in a loopback-only network namespace where one can be made (`unshare -n`
# as root, `unshare -rn` with unprivileged user namespaces). LOOPBACK=0 gives them the network
# (W&B online, a remote Ray cluster).
LOOPBACK ?= 1
# torch is installed before the project so the project's `torch>=2.2` is already satisfied
# and pip never fetches a (multi-GB, CUDA) torch of its own choosing. When $(PYTHON) already
# has torch, the venv sees it (--system-site-packages) and it is kept as it is.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test sweep lint clean

# $(call loopback,COMMAND): run COMMAND in a loopback-only network namespace, or say why not.
define loopback
	@if [ "$(LOOPBACK)" = 1 ] && unshare -n sh -c 'ip link set lo up' 2>/dev/null; then \
		echo "[make] running in a loopback-only network namespace"; \
		unshare -n sh -c 'ip link set lo up && exec "$$@"' sh $(1); \
	elif [ "$(LOOPBACK)" = 1 ] && unshare -rn sh -c 'ip link set lo up' 2>/dev/null; then \
		echo "[make] running in a loopback-only network namespace (user namespace)"; \
		unshare -rn sh -c 'ip link set lo up && exec "$$@"' sh $(1); \
	else \
		[ "$(LOOPBACK)" != 1 ] || echo "[make] WARNING: no loopback-only network namespace can be made here (unshare -n needs root or user namespaces, and ip): running with this machine's network, so every Ray start probes cloud metadata addresses" >&2; \
		$(1); \
	fi
endef

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "keeping the torch of $(PYTHON)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,tune,optuna,bench,rl,mujoco,metaworld]"
	@$(PY) -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, '| lightning', pl.__version__)"
	@touch $@

train: $(STAMP)
	$(VENV)/bin/lightning-meta fit --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(call loopback,$(PY) -m pytest $(ARGS))

sweep: $(STAMP)
	$(call loopback,$(PY) -m tune --config $(CONFIG) --space $(SPACE) $(SWEEP_ARGS))

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache logs wandb lightning_logs
