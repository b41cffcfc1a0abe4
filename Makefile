# netboot: `make run` starts the server on the bundled configs; `make test` runs every test.
# Both install what they need first (Debian packages and a .venv), idempotently.
PY := .venv/bin/python
CONFIG ?= configs/netboot.yaml
ARGS ?=

.PHONY: run test unit e2e bench lint images coreos-image deps deps-test check demo demo-down clean help

help:
	@echo "make run     start netboot on $(CONFIG) (ARGS='--interface br0' to choose)"
	@echo "make test    install test dependencies and run all tests, end-to-end boots included"
	@echo "make unit    tests without QEMU"
	@echo "make e2e     only the end-to-end QEMU boots"
	@echo "make bench   benchmarks against dnsmasq, tftpd-hpa and nginx (ONLY=dhcp|tftp|http|render|storm)"
	@echo "make lint    ruff"
	@echo "make check   validate the bundled configuration"
	@echo "make coreos-image  build (or reuse from /var/cache/netboot-test) the stand-in Container Linux"
	@echo "make demo    a lab rack of three QEMU guests booting; make demo-down removes it"

deps:
	@scripts/setup.sh run

deps-test:
	@scripts/setup.sh test

images/demo/vmlinuz images/demo/initrd.cpio.gz: scripts/demo_os.py
	$(PY) scripts/demo_os.py images/demo

images/commission/initrd.cpio.gz: scripts/commission_os.py scripts/demo_os.py
	$(PY) scripts/commission_os.py images/commission

# The stand-in Container Linux (configs/profiles/coreos.yaml): built once per machine
# into /var/cache/netboot-test/coreos-<hash of its inputs>/, hard-linked into images/.
coreos-image: deps
	$(PY) scripts/coreos_image.py images/coreos

# arm64 loaders and demo OS from Debian's arm64 packages (adds dpkg's arm64 architecture)
images/arm64/demo/vmlinuz: scripts/arm64_os.py scripts/demo_os.py
	$(PY) scripts/arm64_os.py images/arm64

images: deps images/demo/vmlinuz images/commission/initrd.cpio.gz coreos-image images/arm64/demo/vmlinuz

check: deps images
	.venv/bin/netboot check --config $(CONFIG)

run: deps images
	.venv/bin/netboot serve --config $(CONFIG) $(ARGS)

test: deps-test images
	.venv/bin/pytest -ra --durations=40

unit: deps-test
	.venv/bin/pytest -ra -m "not e2e and not lab"

e2e: deps-test images
	.venv/bin/pytest -ra tests/e2e

bench: images
	@scripts/setup.sh bench
	$(PY) bench/run_all.py $(if $(ONLY),--only $(ONLY))

lint: deps-test
	.venv/bin/ruff check netboot tests bench scripts

demo: deps-test images
	$(PY) scripts/demo.py up

demo-down:
	$(PY) scripts/demo.py down

clean:
	rm -rf .venv data images/demo images/commission images/coreos .pytest_cache
