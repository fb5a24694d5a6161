# Two commands on a fresh machine: `make demo` (set up + run the embedded default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# GPU machines: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128 (the CUDA build of the same torch pin);
# empty: the default wheel from the package registry.
TORCH_INDEX ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# torch is installed first and pinned, so no later resolver step pulls a CUDA build.
# Every other dependency is pinned by constraints.txt, so a fresh machine resolves the versions the tests passed with.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/rankmerge demo --workdir .demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/static_merge.py

clean:
	rm -rf $(VENV) .demo .bench
