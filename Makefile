# The two commands a fresh clone needs (see README): `make demo` and `make test`.
# Each one sets up what it needs first; a second run skips what is already done.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnlab compare --out out/compare

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
