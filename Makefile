# Two entry points for a new user: `make demo` and `make test`. Both install first (idempotent).
PY := .venv/bin/python

.PHONY: setup demo demo-build demo-aime test bench clean

setup:
	bash scripts/setup

# the demo world: shipped tiny policy + value model, search methods on its held-out split
demo: setup
	$(PY) -m benchmarks.demo_world

# rebuild the demo world's models from scratch (policy SFT, vgs collect, value_models.train)
demo-build: setup
	$(PY) -m benchmarks.demo_world.build --force

# the pipeline on AIME 2024 with tiny random-weight models (shows the plumbing, ~0% accuracy)
demo-aime: setup
	$(PY) -m benchmarks.demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# the speed goals (issue 24): each script runs one unrecorded warm-up alternation, then alternates
# its arms --repeats times (its own default: 9 for value_scoring, 15 for server_load's demo pair,
# 11 for qsharp_overhead, 5 for search_overhead; REPEATS=N overrides all) and reports
# medians; the last table summarises them all (bench-results/*.json)
REPEATS ?=
BENCH_OUT ?= bench-results
BENCH_ARGS = $(if $(REPEATS),--repeats $(REPEATS)) --out $(BENCH_OUT)
bench: setup
	rm -rf $(BENCH_OUT)
	$(PY) -m benchmarks.value_scoring $(BENCH_ARGS)
	$(PY) -m benchmarks.search_overhead $(BENCH_ARGS)
	$(PY) -m benchmarks.qsharp_overhead $(BENCH_ARGS)
	$(PY) -m benchmarks.server_load $(BENCH_ARGS)
	$(PY) -m benchmarks.summary $(BENCH_OUT)

clean:
	rm -rf .venv .setup-stamp .cache
