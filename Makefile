# The two commands a user needs: `make demo` and `make test`. Both create the environment
# when it is missing and are safe to run again.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench browser orthanc postgres clean-venv

venv: $(STAMP)

# torch goes in first, alone: `torch==2.13.0` is the CPU build pip finds on local disk, where an
# unpinned torch (pulled in by monai) would fetch a multi-GB CUDA build. Everything else is pinned
# by constraints.txt, which records a set known to co-exist (see its header for why).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medtransfer run

# The suite on two pytest-xdist workers (CI has two cores), a test module, or a folder whose
# tests share session fixtures, per worker at a time (tests/conftest.py's scheduler).
test: $(STAMP) browser orthanc postgres
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -n 2 --dist loadscope

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Headless Chromium for the MLflow UI browser test (tests/test_mlflow_ui.py), from Debian's
# packages: Playwright's own browser download cannot reach its host here, so the test drives
# this binary. Installs only when it is missing (CI runs as root; elsewhere through sudo).
# fonts-liberation so that the test's screenshots show readable text.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then \
		echo "browser: $(CHROMIUM) is installed"; \
	else \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y \
			--no-install-recommends chromium fonts-liberation; \
	fi

# Debian's Orthanc, the real PACS the DICOM output test stores into and reads back from
# (tests/deploy/test_dicom_output.py starts its own on loopback ports with a temporary
# configuration; the package's system service is not used). Installs only when missing.
ORTHANC ?= /usr/sbin/Orthanc
orthanc:
	@if [ -x $(ORTHANC) ]; then \
		echo "orthanc: $(ORTHANC) is installed"; \
	else \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y \
			--no-install-recommends orthanc; \
	fi

# PostgreSQL for the scale tests (tests/scale/: the MLflow tracking server's and the Prefect
# server's database). The tests start and stop their own server (initdb in a temporary folder);
# this only makes sure the binaries are there (on PATH or Debian's /usr/lib/postgresql/*/bin)
# and, under root, that the `postgres` user exists: PostgreSQL refuses to run as root, so the
# tests run it as that user.
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "postgres: initdb is installed"; \
	else \
		if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y \
			--no-install-recommends postgresql; \
	fi
	@if [ "$$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then \
		useradd --system --user-group --no-create-home --shell /usr/sbin/nologin postgres; \
	fi

# Benchmarks are measured, not asserted: each prints a table and records it in benchmarks/results/.
bench: $(STAMP)
	$(PY) -m benchmarks.ingest
	$(PY) -m benchmarks.fanout
	$(PY) -m benchmarks.train
	$(PY) -m benchmarks.robustness
	$(PY) -m benchmarks.strategies
	$(PY) -m benchmarks.serving
	$(PY) -m benchmarks.dicom_output
	$(PY) -m benchmarks.many_classes
	$(PY) -m benchmarks.pipeline
	$(PY) -m benchmarks.dataset_version
	$(PY) -m benchmarks.ood
	$(PY) -m benchmarks.auto_strategy
	$(PY) -m benchmarks.transfer_vs_scratch
	$(PY) -m benchmarks.mutation

clean-venv:
	rm -rf $(VENV)
