# mlnb: `make demo` runs the main job on the embedded defaults; `make test` runs every check.
# Both set everything up from a fresh clone: Python packages from uv.lock into .venv (bytecode compiled),
# the `mlnb` Jupyter kernel inside the venv (papermill runs pipelines on it), Debian's chromium (browser test).
SHELL := /bin/bash
VENV  := .venv
BIN   := $(VENV)/bin
export OMP_WAIT_POLICY ?= PASSIVE
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR ?= false

.PHONY: setup system-deps refs demo test check-clean check-export lint nbtest pytest export clean-pipelines lab app serve proto screenshots bench-app

setup: $(VENV)/.installed

$(VENV)/.installed: uv.lock pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	UV_COMPILE_BYTECODE=1 uv sync --frozen
	$(BIN)/python -m ipykernel install --prefix $(VENV) --name mlnb --display-name "Python (mlnb)" >/dev/null
	@touch $@

# Debian packages: chromium (browser test of the app), redis-server (online store test), wrk (serving benchmark),
# gcc (the server compiles trees to C with tl2cgen; without it, it serves with XGBoost), postgresql (MLflow, Optuna and
# serving state on PostgreSQL: the tests start throwaway clusters; its binaries live in /usr/lib/postgresql/*/bin,
# not on PATH) and haproxy (serving replicas behind a load balancer).
system-deps:
	@missing=""; for p in chromium:chromium redis-server:redis-server wrk:wrk gcc:gcc haproxy:haproxy; do \
	  command -v $${p%%:*} >/dev/null 2>&1 || missing="$$missing $${p##*:}"; done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

demo: setup
	$(BIN)/mlnb demo

# The README's test command. Order: notebooks clean, package in sync, layer contracts, inline notebook tests, pytest.
test: setup system-deps refs check-clean check-export lint nbtest pytest

# NannyML 0.13.1 in its own venv: tests/test_performance.py cross-checks mlnb's CBPE against it (subprocess).
.refs/nannyml/.installed: | $(VENV)/.installed
	uv venv -q --allow-existing --python $(BIN)/python .refs/nannyml
	NML_DISABLE_USAGE_LOGGING=1 uv pip install -q --python .refs/nannyml/bin/python nannyml==0.13.1 statsmodels
	@touch $@

# $(call unchanged,FIND-ARGS,COMMAND,MESSAGE): fail when COMMAND changes any file that `find FIND-ARGS` lists.
define unchanged
	@sum() { find $(1) -print0 | sort -z | xargs -0 sha256sum; }; before=$$(sum); $(2) || exit 1; \
	if [ "$$before" != "$$(sum)" ]; then echo "$(3): run 'make export' and commit"; exit 1; fi
endef

# Reference implementations in their own small virtualenvs (they pin old stacks), run by tests and benchmarks as
# subprocesses on the same inputs: GrowthBook's gbstats 0.8.0 needs pandas < 2 (it pulls pandas 1.5.3, numpy 1.26).
refs: .refs/gbstats/.installed .refs/nannyml/.installed .refs/evidently/.installed

.refs/gbstats/.installed:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	uv venv --quiet --allow-existing .refs/gbstats --python 3.11
	uv pip install --quiet --python .refs/gbstats/bin/python "gbstats==0.8.0" "pandas<2" "numpy<2"
	.refs/gbstats/bin/python -c "import gbstats.frequentist.tests, gbstats.utils"
	@touch $@

check-clean: setup
	$(call unchanged,nbs -name '*.ipynb',$(BIN)/nbdev-clean,nbdev-clean changed notebooks)
	@echo "notebooks are clean"

check-export: setup
	$(call unchanged,mlnb -name '*.py',$(BIN)/nbdev-export,notebooks and mlnb/ are not in sync)
	@echo "mlnb/ is in sync with nbs/"

# Layer contracts (pyproject [tool.importlinter]): a lower layer never imports a higher one.
lint: setup
	$(BIN)/lint-imports

nbtest: setup
	$(BIN)/nbdev-test --n-workers 2 --timing

pytest: setup .refs/evidently/.installed
	$(BIN)/pytest tests -q --durations=15

# Evidently 0.7 in its own virtualenv (it pins pandas < 3): tests and `mlnb bench monitor` compare against it.
.refs/evidently/.installed:
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
	uv venv -q --allow-existing .refs/evidently && uv pip install -q --python .refs/evidently/bin/python "evidently==0.7.23" "pandas<3"
	@touch $@

# Developer conveniences
export: setup
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(MAKE) --no-print-directory clean-pipelines

# The gRPC modules generated from mlnb/proto/grpc_predict_v2.proto (committed; tests/test_protocols.py checks them)
proto: setup
	$(BIN)/python -c "from mlnb.grpc_server import generate_stubs, PROTO_DIR; generate_stubs(PROTO_DIR)"

clean-pipelines: setup
	$(BIN)/jupyter nbconvert --clear-output --inplace nbs/pipelines/*.ipynb 2>/dev/null

lab: setup
	uv sync --frozen --extra lab && $(BIN)/jupyter lab

app: setup
	$(BIN)/mlnb app

serve: setup
	$(BIN)/mlnb serve

# The app's pages in a real browser (chromium), on a home filled by a real small pipeline run: apps/screenshots/*.png
screenshots: setup system-deps
	MLNB_SCREENSHOTS=apps/screenshots $(BIN)/pytest tests/test_app.py -q -s -k real_browser

# Render time of every app page on a large home (1M logged predictions, 180 days of timeline, 20 versions), copied
# from the home `make demo` leaves in .mlnb: one JSON object on the last line
bench-app: setup system-deps
	$(BIN)/python tests/bench_app.py --from-home .mlnb --from-reports reports
