# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
#
# Choosing torch: by default the environment gets torch==2.13.0 (on a CPU-only machine with the
# CPU wheel available locally, that is the CPU build; elsewhere pip picks the default build).
# Override with e.g.  make test TORCH_SPEC="torch==2.5.1"  or  TORCH_SPEC="torch"  and
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124" for a specific CUDA build.
# Other packages are pinned by CONSTRAINTS (default constraints.txt): pass another file, e.g.
# make test CONSTRAINTS=my-pins.txt, or none at all with  make test CONSTRAINTS=
#
# `make demo` writes into DEMO_OUT (default runs/demo) and replaces the demo run found there.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dist,convert,dev,docs,bart
CONSTRAINTS ?= constraints.txt
DEMO_OUT ?= runs/demo
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test env lint docs clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip freeze | grep -i '^torch==' > $(VENV)/torch-pin.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/torch-pin.txt -e ".[$(EXTRAS)]" \
		$(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/mri_knee.py --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

docs: $(STAMP)
	$(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
