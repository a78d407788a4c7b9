# VNA: the two commands a new machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Distributed world (make up): the machine's services unless told otherwise.
VNA_INDEX_URL ?= postgresql://postgres@127.0.0.1:5432/vna
VNA_BUS_URL   ?= amqp://guest:guest@127.0.0.1:5672/
VNA_REDIS_URL ?= redis://127.0.0.1:6379/0

# The OHIF viewer served at /viewer (pinned in vna/viewer.py; needs npm once, see README).
VNA_VIEWER_DIR ?= viewer/dist
export VNA_VIEWER_DIR

.PHONY: install lock viewer viewer-optional run up test test-unit lint bench clean

install: $(STAMP)

# constraints.txt pins the whole dependency tree, not only what pyproject.toml names.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

## After changing a pin in pyproject.toml: resolve again, pin the result (then make test)
lock:
	rm -rf $(VENV).lock
	$(PYTHON) -m venv $(VENV).lock
	$(VENV).lock/bin/pip install --quiet --upgrade pip
	$(VENV).lock/bin/pip install --quiet -e ".[dev]"
	{ sed -n '/^#/p' constraints.txt; $(VENV).lock/bin/pip freeze --exclude-editable; } \
	  > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(VENV).lock

## Install the OHIF viewer (@ohif/app's prebuilt dist) into $(VNA_VIEWER_DIR); fails without npm
viewer: install
	$(BIN)/python -m vna.viewer install --dir $(VNA_VIEWER_DIR)

# The same, but a missing npm or registry only prints how to add the viewer.
viewer-optional: install
	@$(BIN)/python -m vna.viewer install --dir $(VNA_VIEWER_DIR) --optional

## Start the archive on embedded defaults: DIMSE VNA@127.0.0.1:11112, HTTP 127.0.0.1:8080
run: install viewer-optional
	$(BIN)/vna run

## Start ingest, index and dicomweb as separate processes on PostgreSQL, RabbitMQ, Redis, S3
up: install viewer-optional
	VNA_INDEX_URL=$(VNA_INDEX_URL) VNA_BUS_URL=$(VNA_BUS_URL) VNA_REDIS_URL=$(VNA_REDIS_URL) \
	  $(BIN)/vna up

## Unit, contract, integration and end-to-end tests (needs dcmtk and the backends; see README)
test: install viewer-optional
	@command -v storescu >/dev/null || { echo "dcmtk is missing: apt-get install -y dcmtk"; \
	  [ -n "$$VNA_TEST_ALLOW_SKIP" ] || exit 1; }
	$(BIN)/python -m pytest -q -rs tests

test-unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check vna services tests bench
	$(BIN)/mypy

## Benchmarks: ingest (BENCH_ARGS), then DICOMweb against Orthanc (DICOMWEB_BENCH_ARGS)
bench: install
	$(BIN)/python -m bench.ingest $(BENCH_ARGS)
	$(BIN)/python -m bench.dicomweb $(DICOMWEB_BENCH_ARGS)

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
