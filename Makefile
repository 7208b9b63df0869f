# Two entry points for a fresh machine: `make serve` and `make test`. Each installs what it needs
# into .venv (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint install clean wheelhouse

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

test: lint
	$(BIN)/python -m pytest

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
