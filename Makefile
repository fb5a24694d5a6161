# Two commands on a fresh machine: `make demo` (set up + run the embedded default job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# GPU machines: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128 (the CUDA build of the same torch pin);
# empty: the default wheel from the package registry.
TORCH_INDEX ?=

.PHONY: setup demo test bench clean gpu-wheels

setup: $(VENV)/.installed

# torch is installed first and pinned, so no later resolver step pulls a CUDA build.
# Every other dependency is pinned by constraints.txt, so a fresh machine resolves the versions the tests passed with.
# The editable install leaves the sources uncompiled: compileall writes their bytecode once, so every process start
# (each CLI call, each Ray worker) skips compiling them even where PYTHONDONTWRITEBYTECODE is set (0.1-0.2 s a start).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m compileall -q rankmerge service workers cluster
	touch $@

demo: setup
	$(BIN)/rankmerge demo --workdir .demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/static_merge.py

# Air-gapped GPU machines whose Python already holds torch (any CUDA build), transformers, accelerate and safetensors:
# the wheels of what they lack — rankmerge itself (built here, --no-deps), pydantic, PyYAML, tqdm and pytest with their
# dependencies — pinned by constraints.txt, the compiled ones for CPython $(GPU_PYTHONS) on manylinux x86_64 (about
# 3 MiB per version: GPU_PYTHONS=3.12 carries one), plus the install list. The install there never touches torch
# (README, GPU machines). Ray and DeepSpeed are not carried: the GPU check's Ray row then skips.
GPU_WHEELS  ?= gpu-wheels
GPU_PYTHONS ?= 3.10 3.11 3.12 3.13
GPU_PURE     = pydantic annotated-types typing-inspection typing-extensions tqdm pytest pluggy iniconfig pygments packaging
GPU_PY310    = exceptiongroup tomli
GPU_BINARY   = pydantic-core pyyaml
PIP_GET      = $(PYTHON) -m pip download -q --no-deps --only-binary=:all: -c constraints.txt -d $(GPU_WHEELS)

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PYTHON) -m pip wheel -q --no-deps -w $(GPU_WHEELS) .
	$(PIP_GET) --python-version 3.10 --implementation py --abi none --platform any $(GPU_PURE) $(GPU_PY310)
	for v in $(GPU_PYTHONS); do \
	  $(PIP_GET) --python-version $$v --implementation cp --platform manylinux2014_x86_64 $(GPU_BINARY) || exit 1; \
	done
	printf '%s\n' rankmerge $(GPU_PURE) $(GPU_BINARY) $(foreach p,$(GPU_PY310),'$(p); python_version < "3.11"') \
	  > $(GPU_WHEELS)/requirements.txt
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .demo .bench
