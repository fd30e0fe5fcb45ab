# imaged: the two Quick start commands are `make demo` and `make test`; each installs what it needs.

SHELL := /bin/bash
CARGO ?= cargo
# apt-get needs root: use sudo when not root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all build demo test deps lint unit deb package-test bench bench-smoke bench-deps bench-journald torture powercut bench-retention clean

all: build

build:
	$(CARGO) build --release

# Mosquitto and its clients, for the demo and the tests (Debian/Ubuntu). fuse3 for the power-cut filesystem
# (tests/powercut): as root it mounts by mount(2) itself and needs no package, but fusermount3 is how it mounts
# for anyone else and how a person unmounts it by hand (`fusermount3 -u`). No libfuse -dev package: the fuser
# crate speaks the FUSE protocol itself.
deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v mosquitto_pub >/dev/null; then \
		echo "Installing mosquitto and mosquitto-clients (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq mosquitto mosquitto-clients >/dev/null; \
	fi
	@if ! command -v fusermount3 >/dev/null; then \
		echo "Installing fuse3 (apt-get)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq fuse3 >/dev/null; \
	fi

# A private broker on a free loopback port, the daemon, and sample.jpg through it.
demo: deps build
	./scripts/demo.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --workspace -- -D warnings

unit:
	$(CARGO) test --lib

# Every test: the lints, the power-cut filesystem's own tests (tests/powercut; first, as they build the binary
# tests/powercut.rs mounts; SKIP lines without /dev/fuse or root), unit, integration against real Mosquitto
# processes, then the Debian package under a real systemd (package-test; skipped with a SKIP line when not root).
test: deps lint
	$(CARGO) test -p powercut-fs
	$(CARGO) test
	$(MAKE) bench-smoke
	$(MAKE) package-test

# imaged on the power-cut filesystem, killed -9 and cut at random moments (tests/powercut.rs; 20 cuts in
# make test). Needs root and /dev/fuse. POWERCUT_CUTS=100 for more, POWERCUT_SEED for other moments.
powercut: deps
	$(CARGO) build -p powercut-fs
	$(CARGO) test --test powercut -- --nocapture

# The Debian package: target/debian/imaged_<version>-1_<arch>.deb, from [package.metadata.deb] in Cargo.toml.
# Man pages and completions come from the CLI definition (`imaged generate-assets`), into target/assets.
DEB_ASSETS := target/assets
deb:
	@$(CARGO) deb --version >/dev/null 2>&1 || { echo "Installing cargo-deb"; $(CARGO) install cargo-deb --locked; }
	$(CARGO) build --release
	rm -rf $(DEB_ASSETS)
	$(CARGO) run --release --quiet -- generate-assets $(DEB_ASSETS)
	gzip -9n $(DEB_ASSETS)/imaged.8 $(DEB_ASSETS)/imaged.toml.5
	$(CARGO) deb --no-build

# Install, run, hang, upgrade, break and purge the package inside a Debian container booted with systemd as
# PID 1 (tests/sandbox). Needs root; builds the package first.
package-test:
	./tests/package.sh

# The benchmark (docs/BENCHMARKS.md): imaged against the load generator, the broker, the disk and the original
# script, on private brokers on free loopback ports, on the folder given and (as root) a loop-mounted journaled
# ext4 and xfs; every image is checked. Options: BENCH_ARGS='--help'. xfsprogs (apt-get) only as root, who
# alone can mount them.
BENCH_ARGS ?=
bench-deps: deps
	@python3 -c 'import paho.mqtt.client' 2>/dev/null || { echo "Installing paho-mqtt (pip) for the original script"; \
		python3 -m pip install -q paho-mqtt || echo "paho-mqtt is not installed: the original is skipped"; }
	@if [ "$$(id -u)" -eq 0 ] && ! command -v mkfs.xfs >/dev/null; then \
		echo "Installing xfsprogs (apt-get) for the xfs rows"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq xfsprogs >/dev/null; } || \
			echo "xfsprogs is not installed: the xfs rows are skipped"; \
	fi

bench: bench-deps
	$(CARGO) build --release
	$(CARGO) bench --bench bench -- $(BENCH_ARGS)

# A few seconds at 10 KB, one run: keeps the harness working in CI (checks every image, asserts no timing).
bench-smoke: bench-deps
	$(CARGO) build --release
	$(CARGO) bench --bench bench -- --smoke

# What the `info` lines cost in journald: the package in the systemd sandbox at info and at warn (root).
bench-journald:
	./benches/journald.sh

# The fault scenarios at scale: at least 1,000 faults over at least 100,000 images, then the summary table
# (docs/RELIABILITY.md). Needs root for the disk faults (tmpfs). TORTURE_ARGS='--minutes 50' etc.
TORTURE_ARGS ?=
torture: deps
	$(CARGO) build --release
	$(CARGO) build --release -p powercut-fs
	$(CARGO) bench --bench torture -- $(TORTURE_ARGS)

# Start-up and one retention pass on 1,000,000 prepared images (README, "Storage and retention"); the CI
# version runs 50,000 in `cargo test --test retention`. RETENTION_ARGS='--images 200000' etc.
RETENTION_ARGS ?=
bench-retention: deps
	$(CARGO) build --release
	$(CARGO) bench --bench retention -- $(RETENTION_ARGS)

clean:
	$(CARGO) clean
