# walletd — the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed

.PHONY: run cluster ha test tools install install-dev lint typecheck pytest wheel-test bench loadtest docs-config clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24" "setuptools>=69" wheel

# Reinstall only when the project definition changes; the editable install
# picks up source edits by itself.
$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev,ha]"
	touch $@ $(RUN_STAMP)

install: $(RUN_STAMP)

install-dev: $(STAMP)

run: install
	$(VENV)/bin/walletd serve

# A local cluster: embedded PostgreSQL, PROCESSES walletd processes and HAProxy at one URL
# (http://127.0.0.1:8000); HAProxy comes from .ci/install-haproxy (docs/SCALING.md).
PROCESSES ?= 2
cluster: install
	.ci/install-haproxy
	$(VENV)/bin/walletd cluster --processes $(PROCESSES)

# The same behind a highly available PostgreSQL: etcd, three Patroni-managed PostgreSQL nodes
# (a primary, a synchronous standby and a second standby) and a PostgreSQL frontend, all on
# loopback (docs/HA.md). Patroni comes with the project's `ha` extra, etcd from .ci/install-etcd.
ha: install
	$(PY) -m pip install --quiet -e ".[ha]"
	.ci/install-haproxy
	.ci/install-etcd
	$(VENV)/bin/walletd ha-dev --processes $(PROCESSES)

# mypy does not follow setuptools' package-dir mapping, so it reads the
# namespace package through a tree of symlinks (docs/ARCHITECTURE.md, "Packaging"). Rebuilt when this file
# changes, so a checkout with an older tree gets the links of packages added since.
.typecheck/walletd: Makefile
	mkdir -p .typecheck/walletd
	ln -sfn ../../engine .typecheck/walletd/engine
	ln -sfn ../../http .typecheck/walletd/http
	ln -sfn ../../persistence .typecheck/walletd/persistence
	ln -sfn ../../cli .typecheck/walletd/cli
	ln -sfn ../../client .typecheck/walletd/client

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install-dev .typecheck/walletd
	MYPYPATH=.typecheck $(VENV)/bin/mypy -p walletd.engine -p walletd.http -p walletd.persistence -p walletd.cli -p walletd.client
	MYPYPATH=.typecheck $(VENV)/bin/mypy tests loadtest examples

pytest: install-dev
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The external tools the suite needs (Chromium, docker-compose, ...): every executable
# .ci/install-* is idempotent, installs what is missing when run as root, and otherwise
# fails naming the one command that would install it. A test whose tool is missing fails
# rather than skips, so `make test` runs them first instead of reporting a green skip.
tools:
	@for script in .ci/install-*; do \
		if [ -x "$$script" ]; then "$$script" || exit 1; fi; \
	done

test: tools lint typecheck pytest

# Builds the wheel and imports every subpackage from it in a clean venv, because an
# editable install hides a package missing from `packages` (docs/ARCHITECTURE.md, "Packaging").
wheel-test: install-dev
	rm -rf dist build/wheel-venv
	$(PY) -m build --wheel --outdir dist . >/dev/null
	$(PYTHON) -m venv build/wheel-venv
	build/wheel-venv/bin/pip install --quiet dist/*.whl
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import walletd.engine, walletd.http, walletd.persistence, walletd.cli.main, walletd.client.api, http.client, sysconfig; assert http.client.__file__.startswith(sysconfig.get_paths()['stdlib'])"
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "import pathlib, walletd.client; from walletd.client import WalletdClient; assert (pathlib.Path(walletd.client.__file__).parent / 'py.typed').is_file()"
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "from walletd.persistence.migrate import migrations; assert migrations(), 'no migrations in the wheel'"
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/python -c "from walletd.http.openapi import openapi_json_bytes; assert openapi_json_bytes(), 'no OpenAPI document in the wheel'"
	cd /tmp && $(CURDIR)/build/wheel-venv/bin/walletd serve --help >/dev/null

bench: install-dev tools
	$(PY) -m loadtest.bench
	$(PY) -m loadtest.bulk_bench
	$(PY) -m loadtest.cluster_bench
	$(PY) -m loadtest.payment_bench

loadtest: install-dev
	$(PY) -m loadtest.run_locust

# env.example and the configuration tables in README.md and docs/DOCKER.md are rendered from
# cli/config.py SETTINGS; tests/test_deployment.py fails until this is run after a change.
docs-config: install
	$(PY) -m walletd.cli.config --env-example > env.example
	$(PY) -m walletd.cli.config --update-docs README.md docs/DOCKER.md

clean:
	rm -rf $(VENV) .typecheck build dist .pytest_cache .mypy_cache .ruff_cache
