# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first
# (once; later runs reuse it) and never pull a CUDA build of torch on a machine without CUDA.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is installed first and on its own: CPU build by default. GPU users: install the torch
# build for your CUDA into $(VENV) (or set TORCH_SPEC / TORCH_INDEX) before `make`.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup demo test bench bench-quick bench-quality bench-lr gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-test.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "installing $(TORCH_SPEC) (CPU build unless TORCH_INDEX says otherwise)"; \
		$(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_SPEC)"; \
	fi
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-test.txt
	@touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/python train_network.py --config_file configs/demo.toml

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python -m benchmarks.run_all

bench-quick: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python -m benchmarks.run_all --quick

# the quality benchmark alone (about 45 minutes on a 2-core CPU), then docs/benchmarks.md
bench-quality: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python -m benchmarks.bench_quality --jobs 2
	$(BIN)/python -m benchmarks.run_all --render-only

# each optimizer over a fixed lr grid (about 17 minutes on 2 cores; needs the results of bench-quality)
bench-lr: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python -m benchmarks.bench_lr_sensitivity --jobs 2
	$(BIN)/python -m benchmarks.run_all --render-only

# GPU readiness (under 5 minutes on one GPU): AdamW parity, bit-exact resume, 8-bit tracking,
# non-finite gradient skip, bf16 stochastic rounding and no host sync in step(), for every
# registered optimizer on CUDA tensors, then bench_step --quick --device cuda (against fused AdamW
# and bitsandbytes AdamW8bit; results/step_cuda_quick.json). One PASS/FAIL line per check, exit 1
# on a failure. Without a CUDA GPU it says so and exits 0; `--device cpu` runs the checks on CPU.
# Needs a CUDA build of torch in $(VENV) (see TORCH_INDEX above).
gpu-check: setup
	$(BIN)/python -m pip install -q -r requirements-bench.txt
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache demo_output
