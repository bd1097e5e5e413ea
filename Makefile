# Set-up on a fresh machine is `make demo` (the main job) or `make test` (the test suite).
# Both create .venv with the pinned CPU build of torch (no CUDA wheels, no torchvision); the demo
# installs the package alone, the tests and docs add their extras and mergekit on top.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
OUT ?= vlm_probe_out
MERGEKIT_PACKAGES := mergekit==0.1.5 pydantic==2.14.4 pydantic-core==2.50.5 immutables==0.21 click==8.5.1 \
	annotated-types==0.8.0 typing-inspection==0.4.5 peft==0.21.2 sentencepiece==0.2.3

.PHONY: install demo test docs bench gpu-check clean

$(RUNTIME): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,docs]"
	# mergekit, kept apart from the project's packages (tests compare merges with it)
	$(PY) -m pip install -q --no-deps --target $(VENV)/mergekit $(MERGEKIT_PACKAGES)
	touch $(STAMP)

install: $(STAMP)

demo: $(RUNTIME)
	HF_HUB_OFFLINE=1 $(VENV)/bin/vlm-probe analyze --out $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mkdocs build --strict

# every benchmark, about 40 min on 2 cores; weight_deltas and merge need about 9 GB in /tmp
BENCHMARKS := tracing_overhead memory_soak patching_sweep vision_swap attention_mass attribution weight_deltas spectra merge testbed_build analyze_job

bench: $(STAMP)
	for b in $(BENCHMARKS); do echo "== $$b"; HF_HUB_OFFLINE=1 $(PY) benchmarks/$$b.py || exit 1; done

# one GPU, under 8 minutes: random models at the real Qwen2.5-VL-3B/-7B and LLaVA-1.5-7B dimensions in bf16;
# checks and timing ratios in one table (without a GPU: $(PY) benchmarks/gpu_check.py --small)
gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) site $(OUT)
