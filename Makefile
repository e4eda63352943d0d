# Two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q -c constraints.txt
# CPU machines: the pinned CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
# The package index of our CI machines serves torch==2.13.0 as the CPU wheel; plain PyPI serves
# a CUDA build under that name: there, set TORCH to PyTorch's CPU wheel (--index-url .../cpu).
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench clean

# 3.11 or newer (the pinned numpy, pandas and scipy need it)
PYTHON ?= python3

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else \
	  "qgscale needs Python >= 3.11; run make with PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo: $(PY) pyproject.toml constraints.txt
	$(PIP) $(TORCH)
	$(PIP) -e '.[demo]'
	touch $@

$(VENV)/.test: $(VENV)/.demo
	$(PIP) -e '.[test,demo,tracking]'
	touch $@

demo: $(VENV)/.demo
	HF_HUB_OFFLINE=1 $(VENV)/bin/qgscale run configs/demo.yaml

test: $(VENV)/.test
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -p no:cacheprovider --durations=25

lint: $(VENV)/.test
	$(VENV)/bin/ruff check qgscale tests benchmarks

bench: $(VENV)/.test
	mkdir -p bench-out
	for b in teacher_scoring training index_build; do \
	  $(PY) benchmarks/$$b.py --quick --out bench-out/$$b.json || exit 1; done

clean:
	rm -rf $(VENV) runs bench-out
