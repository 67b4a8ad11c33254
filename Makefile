# Two entry points for a fresh machine: `make run` (default extraction job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Two test processes (pytest-xdist): most of the suite's time is single-threaded job start-up, so
# on 2 cores it takes ~14 minutes instead of ~21. PYTEST_ARGS= runs it in one process.
PYTEST_ARGS ?= -n 2

.PHONY: install run test test-quick template portable-run prism clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# fake-gcs-server: a GCS API server that enforces preconditions (ifGenerationMatch), which the
# output lock relies on and gcp-storage-emulator ignores. Built from the Go module proxy.
FAKE_GCS_SERVER := github.com/fsouza/fake-gcs-server@v1.56.1

# prism: Beam's portable runner in Go (--runner=PrismRunner), the same release as the Python SDK,
# built from the Go module proxy into the venv, where the pipeline looks for it.
PRISM := github.com/apache/beam/sdks/v2/go/cmd/prism@v2.77.0

$(BIN)/prism: $(BIN)/python
	GOBIN=$(abspath $(BIN)) GOFLAGS=-mod=mod go install $(PRISM)

prism: $(BIN)/prism

$(VENV)/.installed-test: setup.py $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	GOBIN=$(abspath $(BIN)) GOFLAGS=-mod=mod go install $(FAKE_GCS_SERVER)
	GOBIN=$(abspath $(BIN)) GOFLAGS=-mod=mod go install $(PRISM)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/python -m beam_extract --runner=DirectRunner --overwrite $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# Build the image (Cloud Build) and the Flex Template spec: make template IMAGE=... TEMPLATE=gs://...
template: $(VENV)/.installed
	$(BIN)/python -m beam_extract.template --check
	gcloud builds submit --tag "$(IMAGE)" .
	gcloud dataflow flex-template build "$(TEMPLATE)" --image "$(IMAGE)" --sdk-language PYTHON \
		--metadata-file templates/metadata.json

# The self-managed worker-pool topology on this machine: job service + worker pool on loopback.
portable-run: $(VENV)/.installed
	$(BIN)/python -m beam_extract.portable_local $(ARGS)

clean:
	rm -rf $(VENV) activations .pytest_cache
