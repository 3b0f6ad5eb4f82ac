# Two commands do everything on a fresh machine:
#   make demo   - set up .venv (+ the demo extra: rich, matplotlib) and run `elasticpg demo`:
#                 MoE serving over elasticpg.ep through a SIGKILL, both join modes compared
#   make test   - set up .venv and run lint + the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: an open range could pull a multi-GB CUDA build
TORCH := torch==2.13.0

.PHONY: setup demo test bench lint clean system-packages

# setup.py and the C sources too: a changed optional C helper must be rebuilt, not skipped
$(BIN)/.installed: pyproject.toml setup.py $(wildcard elasticpg/*/*.c)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $@

setup: $(BIN)/.installed

$(BIN)/.demo-installed: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[demo]"
	touch $@

demo: $(BIN)/.demo-installed
	$(BIN)/elasticpg demo --compare

lint: setup
	$(BIN)/ruff check elasticpg tests examples

# As root on Debian (CI), install the system packages the tests start for real when missing:
# etcd (a 3-member cluster for the etcd store's tests) and iproute2 (network namespaces).
# Elsewhere those tests skip and say why.
system-packages:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    missing=""; \
	    command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	    command -v ip >/dev/null || missing="$$missing iproute2"; \
	    if [ -n "$$missing" ]; then \
	        echo "installing$$missing"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	    fi; \
	fi

test: lint system-packages
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/elasticpg-bench

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
