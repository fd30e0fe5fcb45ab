# imaged: the two Quick start commands are `make demo` and `make test`; each installs what it needs.

SHELL := /bin/bash
CARGO ?= cargo
# apt-get needs root: use sudo when not root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all build demo test deps lint unit deb bench torture clean

all: build

build:
	$(CARGO) build --release

# Mosquitto and its clients, for the demo and the tests (Debian/Ubuntu).
deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null; then \
		echo "Installing mosquitto and mosquitto-clients (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi

# A private broker on a free loopback port, the daemon, and sample.jpg through it.
demo: deps build
	./scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

unit:
	$(CARGO) test --lib

# Every test: unit, integration against real Mosquitto processes, and the lints.
test: deps lint
	$(CARGO) test --all-targets

clean:
	$(CARGO) clean
