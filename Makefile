# Two entry points, both from a fresh clone: `make demo` and `make test`.
# Everything installs into .venv; caches stay under .cache/.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.m3i-installed

# DeepSpeed compiles no CUDA ops at install (DS_BUILD_OPS=0); on CPU it runs on gloo.
export DS_BUILD_OPS := 0
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

# torchx 0.7.0 (its last release) pins urllib3<1.27, which clashes with kfp's pins:
# install it without dependencies, plus what it really imports.
TORCHX := torchx==0.7.0 pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions==1.2.0 \
          docstring-parser==0.18.0 importlib-metadata==8.7.0 zipp==4.1.2 docker==7.2.0 \
          filelock==4.3.1 fsspec==2026.9.0 tabulate==0.10.0

.PHONY: install services tools demo test clean ablation

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps $(TORCHX)
	touch $@

# The main job: the Kubeflow pipeline m3i-pretrain on this machine (kfp.local) on the demo data.
demo: install
	$(BIN)/m3i pipeline run-local

# The ablation behind docs/ablation.md (about 35 min on 2 cores): an experiment beside the package,
# run from this checkout; finished arms are kept in m3i-data/ablation and skipped on a re-run.
ablation: install
	$(BIN)/m3i demo-data --out m3i-data/abl/raw
	$(BIN)/python -m experiments.ablation --preset demo --demo-root m3i-data/abl/raw --steps 300 --seeds 0 1 2 \
		--curve-every 100 --jobs 2 --workdir m3i-data/ablation --doc docs/ablation.md

# Prometheus and its Pushgateway (Debian packages) for the metrics tests.
services:
	bash scripts/install-services.sh

# helm, hadolint and checkov for the deployment tests, into .cache/tools (offline linters).
tools:
	bash scripts/install-k8s-tools.sh

test: install services tools
	$(BIN)/pytest -q --durations=25

clean:
	rm -rf $(VENV) .cache m3i-data
