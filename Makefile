# The two commands a fresh clone needs (see README): `make demo` and `make test` (and `make serve`, the web app).
# Each one sets up what it needs first; a second run skips what is already done.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

CHROMIUM := /usr/bin/chromium

.PHONY: demo serve test test-slow bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c requirements/lock.txt -e '.[lab,test,web,ray]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bnlab compare --out out/compare

serve: $(STAMP)
	$(VENV)/bin/bnlab serve

# The browser tests drive Debian's Chromium (never a browser downloaded by playwright); they are never skipped.
$(CHROMIUM):
	$$( [ "$$(id -u)" = 0 ] || echo sudo ) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium'

# `make test`: everything but the tests marked slow (under two minutes here); `make test-slow`: those.
test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) benchmarks/bench_ops.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
