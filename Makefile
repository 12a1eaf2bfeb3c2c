# Two entry points (see README): `make run` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup system run serve test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test,md]"
	touch $(STAMP)

# Debian packages and services the tests drive: tmux (the console's end-to-end test) and a
# one-node SLURM (slurm-wlm + munge, started by deploy/slurm/dev-cluster.sh; the slurm
# provider's tests). Installed and started when missing and we are root (CI is); otherwise
# those tests say they are skipped and why.
system:
	@command -v tmux >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; }; } || \
	  echo "note: tmux is not installed; the console's tmux test will be skipped"
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  bash deploy/slurm/dev-cluster.sh up >/dev/null; \
	else echo "note: not root; SLURM tests run only if a cluster is already up"; fi

run: setup
	$(BIN)/relaymd --demo

serve: setup
	$(BIN)/relaymd serve

lint: setup
	$(BIN)/ruff check relaymd tests bench

test: setup system lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python bench/control_plane.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
