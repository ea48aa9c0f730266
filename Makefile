# edgeota — the two commands of the quick start are `make demo` and `make test`.
# Each target creates .venv and installs what it needs when missing or when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.edgeota-installed

.PHONY: venv browser demo test test-fast lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py device_agent/_telemetry_native.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch first: then the [torch] range installs nothing more (no CUDA wheels).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@# Only the ONNX file of this wheel is read (a real text detector for packager tests); its own imports need OpenCV.
	$(PY) -m pip install -q --no-deps rapidocr-onnxruntime==1.4.4
	@touch $(STAMP)

demo: venv
	$(PY) -m edgeota.cli demo --loop --approve

# The dashboard's browser tests drive Debian's Chromium through its chromedriver (never a browser download).
# Installed as root with apt-get when missing. If that fails, `make test` goes on and the browser tests fail,
# each saying the browser is missing (tests/web/browser.py): they never skip.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "error: /usr/bin/chromium or /usr/bin/chromedriver missing; as root: apt-get install -y chromium chromium-driver" >&2; \
	  exit 1; \
	fi; \
	echo "installing Debian's chromium and chromium-driver (apt-get)"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver

test: venv
	-@$(MAKE) --no-print-directory browser
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -m "not integration"

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

bench: venv
	$(PY) -m bench.run

clean:
	rm -rf .demo bench/.work .pytest_cache .mypy_cache .ruff_cache
