# capd-inplace: the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test lint build bench image image-local e2e e2e-kind

IMAGE ?= capd-inplace:dev

## run: serve the Runtime Extension over HTTPS with a self-signed dev certificate on :9443
run:
	$(CARGO) run --release -- serve --dev-self-signed --artifact-cache-dir .cache/artifacts

## build: build every binary in release mode
build:
	$(CARGO) build --release --workspace

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: unit, integration and end-to-end tests (needs a Docker Engine: scripts/ensure-docker.sh).
## The simulated node image is built first (minutes on a new machine, seconds after that).
test:
	bash scripts/build-simnode-image.sh >/dev/null
	$(CARGO) test --workspace

## bench: every benchmark (hook load, hook instructions, staging, node overhead, scale, decision), unattended;
## writes the tables into docs/benchmarks.md (needs a Docker Engine)
bench:
	bash scripts/bench.sh

## e2e: the CAPI-faithful end-to-end scenarios on simulated clusters (needs a Docker Engine)
e2e:
	bash scripts/build-simnode-image.sh >/dev/null
	$(CARGO) build -p capd-inplace --bin capd-inplace
	$(CARGO) build -p capd-inplace-simnode --bin simnode
	$(CARGO) test -p capd-inplace-e2e --test scenarios

## image: build the container image from the Dockerfile (pulls the rust and distroless base images)
image:
	docker build -t $(IMAGE) .

## image-local: build the same runtime image without a registry (host cargo build + docker import)
image-local:
	bash scripts/build-image-local.sh $(IMAGE)

## e2e-kind: the in-place upgrade on kind + Cluster API + CAPD (needs image pulls; see the script)
e2e-kind:
	bash scripts/e2e-kind.sh
