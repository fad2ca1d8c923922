# capd-inplace: the two commands that matter are `make run` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: run test lint build fmt

## run: serve the Runtime Extension over HTTPS with a self-signed dev certificate on :9443
run:
	$(CARGO) run --release -- serve --dev-self-signed

## build: build every binary in release mode
build:
	$(CARGO) build --release --workspace

## lint: formatting and clippy, warnings are errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## test: unit, integration and end-to-end tests (needs a Docker Engine: scripts/ensure-docker.sh)
test:
	$(CARGO) test --workspace
