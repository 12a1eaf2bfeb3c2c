# Two entry points (see README): `make run` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup run serve test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test,md]"
	touch $(STAMP)

run: setup
	$(BIN)/relaymd --demo

serve: setup
	$(BIN)/relaymd serve

lint: setup
	$(BIN)/ruff check relaymd tests bench

test: setup lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/control_plane.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
