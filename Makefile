# Set-up on a fresh machine is `make demo` (the main job) or `make test` (the test suite).
# Both create .venv with the pinned CPU build of torch (no CUDA wheels, no torchvision).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= vlm_probe_out

.PHONY: install demo test docs bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,docs]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

docs: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/tracing_overhead.py
	HF_HUB_OFFLINE=1 $(PY) benchmarks/memory_soak.py

clean:
	rm -rf $(VENV) site $(OUT)
