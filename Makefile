# Two commands for a newcomer: `make demo` and `make test`. Both create .venv first.
# For contributors: `make lint` (CI runs it before the tests), `make format`, `make test-fast`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_CFG := configs/demo/swin_demo_digits.yaml
DEMO_OUT := output/swin_demo_digits/demo

.PHONY: venv demo test test-fast lint format gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/prepare_demo_data.py --out demo_data
	$(PY) main.py --cfg $(DEMO_CFG) --tag demo
	$(PY) main.py --cfg $(DEMO_CFG) --tag demo --eval --resume $(DEMO_OUT)/best.pth
	$(PY) main.py --cfg $(DEMO_CFG) --tag demo --throughput
	$(PY) scripts/plot_logs.py $(DEMO_OUT)
	@echo ""
	@echo "logs:        $(DEMO_OUT)/log_rank0.txt"
	@echo "config:      $(DEMO_OUT)/config.yaml"
	@echo "checkpoints: $(DEMO_OUT)/best.pth, $(DEMO_OUT)/last.pth"
	@echo "tensorboard: $(VENV)/bin/tensorboard --logdir $(DEMO_OUT)/tensorboard"
	@echo "curves:      $(DEMO_OUT)/curves.png"

test: venv
	$(PY) -m pytest -q -n auto --dist loadfile

# ruff: the rules are in pyproject.toml; `make format` rewrites what `make lint` would refuse.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: venv
	$(PY) -m pytest -q -n auto --dist loadfile -m "not slow"

# On a GPU machine, with its own python3 (torch there; yacs/termcolor from .whl/ if missing).
gpu-check:
	$(PYTHON) scripts/gpu_check.py --out $${OUT:-output/gpu-check}

clean:
	rm -rf output demo_data .pytest_cache
