# Two commands do all the set-up on a fresh machine:
#   make demo   - creates .venv, installs normjax with the examples' extras only, runs the flagship example
#                 in quick mode
#   make test   - creates .venv, installs normjax with every extra (flax, equinox, test, examples, docs, dev,
#                 aot), runs the whole test suite (`pytest -m 'not slow'` is the fast inner loop)
#   make accelerators - what each norm costs on a GPU (H100) and a TPU (v5e), from their compilers (no device)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= outputs

.PHONY: demo test bench accelerators docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[flax,equinox,test,examples,docs,dev,aot]"
	touch $(STAMP)

# The demo needs the library and the examples' extras only: no PyTorch, no test or docs tools.
DEMO_STAMP := $(VENV)/.installed-demo

$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[examples]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python examples/multi_device_training.py --quick --out $(OUT)/multi_device_training

test: $(STAMP)
	$(BIN)/ruff check normjax tests examples benchmarks
	$(BIN)/ruff format --check normjax tests examples benchmarks
	$(BIN)/python -m pytest -n 2 -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out $(OUT)/benchmarks

accelerators: $(STAMP)
	JAX_PLATFORMS=cpu $(BIN)/python benchmarks/accelerators.py --out $(OUT)/accelerators

docs: $(STAMP)
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) $(OUT) docs/_build
