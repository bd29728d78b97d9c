# metasolve: two commands on a fresh machine — `make demo` and `make test`.
VENV        ?= .venv
PY          := $(VENV)/bin/python
MPIEXEC     := $(VENV)/bin/mpiexec
STAMP       := $(VENV)/.metasolve-setup

.PHONY: setup demo test test-mpi bench legacy-solver clean-venv clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m metasolve demo

test: setup legacy-solver
	$(PY) -m pytest -q

test-mpi: setup
	$(PY) -m pytest -q tests/test_parallel.py tests/test_mpi_training.py

bench: setup legacy-solver
	$(PY) -m benchmarks

legacy-solver: setup
	@$(MAKE) --no-print-directory -C examples/legacy_solver PYTHON=$(abspath $(PY))

clean-venv:
	rm -rf $(VENV)

clean:
	rm -rf runs build *.egg-info .pytest_cache
	@$(MAKE) --no-print-directory -C examples/legacy_solver clean
