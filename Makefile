PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup setup-system test demo bench bench-proto bench-scp lint

# Python packages for running and testing (idempotent).
setup:
	$(PIP) install -q -e '.[test]'

# Debian packages some tests and benchmarks use as real peers (sshd, socat, haproxy, tinyproxy, rsync,
# prometheus: promtool and a real Prometheus for deploy/monitoring).
setup-system:
	bash .ci/system-packages

# Two workers (2 cores), each running whole test files, in collection order (tests/conftest.py puts
# the files with long tests first, so that none is left running alone at the end; xdist's default
# order, by number of tests per file, started them last); `-p no:benchmark` keeps a pytest-benchmark
# that may be installed on the machine from refusing to run under xdist.
test: setup setup-system
	$(PYTHON) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -p no:benchmark

demo: setup
	$(PYTHON) -m kins_tunnel demo

bench: setup setup-system
	$(PYTHON) -m benchmarks.run

bench-proto: setup
	$(PYTHON) -m benchmarks.proto_bench

bench-scp: setup setup-system
	$(PYTHON) -m benchmarks.scp

lint:
	$(PYTHON) -m ruff check kins_tunnel tests benchmarks
	$(PYTHON) -m ruff format --check kins_tunnel tests benchmarks
	$(PYTHON) -m mypy
