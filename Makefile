# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# On the project's CPU machines this pin resolves to a local CPU build; a looser spec
# downloads a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The tests run the kernels in Triton's interpreter and compile them through Triton's driver
# interface (benchmarks/kernel_resources.py); a new Triton is taken on purpose, not by a fresh install.
TRITON_SPEC ?= triton==3.9.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: env test demo lint clean

env: $(STAMP)

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q --durations=15

# Pre-trains the tiny model in 2 CPU processes on the toy world (generated in data/toy on first
# use) for 7-8 minutes, then prints held-out metrics per stream mode.
demo: $(STAMP)
	rm -rf runs/demo
	OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config ds_configs/cpu.json \
		--preset tiny --output_dir runs/demo --max_steps 1500 --eval_every 500 --eval_batches 10 --num_workers 0

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) data/toy runs outputs
