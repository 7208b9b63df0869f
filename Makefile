# Two entry points for a fresh machine: `make serve` and `make test`. Each installs what it needs
# into .venv (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint install clean wheelhouse system-packages docker-test podman-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/shotcache serve

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# What the tests need from Debian (as root, only what is missing): Chromium for the page's browser tests;
# iproute2's `ip` to bring up the loopback of the Ray test's private network namespace (unshare is
# util-linux, always there). PostgreSQL is installed by its own test fixture
# (benchmarks/postgres_server.py), which keeps Debian's package from creating and starting a cluster.
SYSTEM_PACKAGES := chromium iproute2
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $$missing"; apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	elif [ -n "$$missing" ]; then echo "not installed (their tests skip): $$missing"; fi

test: lint system-packages
	$(BIN)/python -m pytest

# The container image's full proof (build, run, restart, memory; minutes): docker/README.md.
docker-test:
	docker/test-image.sh

# The same proof with podman (podman build --format docker, its own store, deleted at exit).
podman-test:
	SHOTCACHE_ENGINE=podman docker/test-image.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Every wheel the Docker image installs (docker/requirements.py: the project's dependencies, its build
# backend, dumb-init), for Linux x86_64 / CPython 3.11, into $(WHEELHOUSE) (a folder inside the build
# context). Then build with no index at all: docker build --build-arg WHEELHOUSE=$(WHEELHOUSE) ...
# (docker/README.md, "Air-gapped"). PIP_INDEX_URL / PIP_EXTRA_INDEX_URL from the environment apply.
WHEELHOUSE ?= wheelhouse
# pip download does not widen a --platform to older glibc versions by itself: name them all, up to
# Debian bookworm's glibc 2.36 (the oldest base the image supports; python:3.11-slim is bookworm or newer).
WHEEL_PLATFORMS ?= manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64 \
	$(foreach minor,5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36,manylinux_2_$(minor)_x86_64)
wheelhouse:
	mkdir -p $(WHEELHOUSE)
	$(PYTHON) docker/requirements.py > $(WHEELHOUSE)/requirements.txt
	$(PYTHON) -m pip download --dest $(WHEELHOUSE) --only-binary=:all: \
		$(WHEEL_PLATFORMS:%=--platform %) --implementation cp --python-version 3.11 --abi cp311 \
		-r $(WHEELHOUSE)/requirements.txt
