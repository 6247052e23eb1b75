# Two entry points for a new user: `make demo` and `make test`. Both install first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo test bench clean

setup:
	bash scripts/setup

demo: setup
	$(PY) -m benchmarks.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) -m benchmarks.value_scoring
	$(PY) -m benchmarks.search_overhead
	$(PY) -m benchmarks.qsharp_overhead

clean:
	rm -rf .venv .setup-stamp .cache
