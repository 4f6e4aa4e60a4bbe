# One entry point for a fresh machine. `make demo` runs the main job, `make test` every test.
# Both create .venv and install what they need themselves (as root, system packages too).
SHELL := bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps test lint demo bench clean

$(STAMP): pyproject.toml setup.py $(wildcard protos/*.proto)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Meshplane needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(STAMP)

system-deps:
	@bash tests/system-deps.sh

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy cannot follow setuptools' editable import hook: give it the namespace as a tree of links.
	@mkdir -p $(VENV)/typecheck/meshplane
	@for d in controlplane webhook bootstrap protos sandbox; do ln -sfn ../../../$$d $(VENV)/typecheck/meshplane/$$d; done
	MYPYPATH=$(VENV)/typecheck $(BIN)/mypy -p meshplane.controlplane -p meshplane.webhook -p meshplane.bootstrap -p meshplane.sandbox

test: install system-deps lint
	$(BIN)/pytest

demo: install system-deps
	$(BIN)/meshctl demo

# Each benchmark starts and stops its own `meshctl serve` on loopback; about half an hour in all
# (mesh_scale.py's 5,000-sidecar storm is most of it). mesh_scale.py writes bench-results/mesh_scale.{json,png}.
bench: install
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(BIN)/python benchmarks/webhook_load.py
	$(BIN)/python benchmarks/xds_push.py
	$(BIN)/python benchmarks/kube_scale.py
	$(BIN)/python benchmarks/config_build.py
	$(BIN)/python benchmarks/mesh_scale.py --sidecars 1000 --out bench-results

clean:
	rm -rf $(VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi
