# The README's two commands: `make demo` (main job) and `make test` (the whole suite).
# Both set up everything they need on a fresh machine: a virtualenv, the package, redis-server.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint crds redis-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

demo: $(STAMP)
	$(BIN)/tandem demo

test: $(STAMP) redis-server
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadgroup

crds: $(STAMP)
	$(BIN)/tandem operator crds --out crds

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
