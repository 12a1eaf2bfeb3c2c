# Two entry points (see README): `make run` and `make test`. Both set up .venv from scratch.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup system run serve test test-fast test-binary binary lint bench clean \
	container-tools images test-images

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test,md]"
	touch $(STAMP)

# Debian packages and services the tests drive: tmux (the console's end-to-end test), chromium
# (`relaymd web`'s browser test, driven by Playwright) and a one-node SLURM (slurm-wlm + munge,
# started by deploy/slurm/dev-cluster.sh; the slurm provider's tests). Installed and started
# when missing and we are root (CI is); otherwise those tests say they are skipped and why.
system:
	@command -v tmux >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; }; } || \
	  echo "note: tmux is not installed; the console's tmux test will be skipped"
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } || \
	  echo "note: chromium is not installed; the web console's browser test will be skipped"
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

# Unit and integration layers only (no worker processes, SLURM, benchmarks): a quick check
# while working; `make test` is the one that counts.
test-fast: setup lint
	$(BIN)/pytest -q -m "not system"

# The operator CLI as one self-contained executable (dist/relaymd) for login nodes without a
# Python environment. Slow (a minute or two), so not part of `make test`; CI runs test-binary.
binary: setup
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[binary]"
	$(BIN)/pyinstaller --noconfirm --clean --onefile --name relaymd --collect-data relaymd \
	  --collect-data textual_serve --exclude-module openmm \
	  --distpath dist --workpath build/pyinstaller --specpath build relaymd/__main__.py
	./dist/relaymd --version

test-binary: binary
	$(BIN)/pytest -q tests/test_binary.py

# The worker and orchestrator images, built from the working tree with podman (else buildah or
# docker) on a Debian base made here with debootstrap (no registry needed): deploy/images.sh.
# podman, runc and debootstrap are installed when missing and we are root (CI is). Slow (minutes
# the first time), so not part of `make test`; CI runs test-images, which runs a real OpenMM job
# and a SIGTERM hand-off inside the worker image (tests/test_images.py).
container-tools:
	@{ command -v podman && command -v runc && command -v debootstrap; } >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends podman runc debootstrap >/dev/null; }; } || \
	  echo "note: podman, runc or debootstrap is missing and cannot be installed here (not root)"

images: container-tools
	bash deploy/images.sh

test-images: setup images
	RELAYMD_TEST_IMAGES=1 $(BIN)/pytest -q tests/test_images.py

bench: setup
	$(BIN)/python bench/control_plane.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
