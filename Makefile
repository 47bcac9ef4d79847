# sandbox-kernel: the two commands of the quick start are `make demo` and `make test`.
# Both install what they need (Debian packages when root, a virtualenv, the native executor).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CC ?= cc
# the executor's compiler flags, shared with setup.py and the tests
CFLAGS_RT := $(shell cat sandbox_kernel/runtime/native/cflags)
DEB_PACKAGES := gcc libc6-dev make uidmap mmdebstrap qemu-system-x86 busybox-static cpio skopeo umoci zstd bubblewrap iproute2 python3-venv clang-format clang-tidy cppcheck chromium docker-registry apache2-utils openssl nftables slirp4netns
RUNTIME := sandbox_kernel/runtime/_bin/sk-runtime

.PHONY: help deps venv native install labextension vm-setup demo hub-demo hub-demo-clean test test-unit test-unit-matrix test-privileged test-rootless test-cgroup-v2 test-cgroup-v2-native lint lint-c bench bench-rootless clean

help:
	@echo "make demo            build what is missing, run the Python 2.7 and Python 3 notebooks side by side"
	@echo "make hub-demo        (root) a JupyterHub on 127.0.0.1:8000 with two students and an instructor"
	@echo "make test            the whole test suite (lint, types, unit, privileged, cgroup v2 in a VM)"
	@echo "make test-cgroup-v2  the cgroup v2 selection in a QEMU guest (or natively: tools/vm/run-tests.sh --native)"
	@echo "make labextension    rebuild the JupyterLab extension (npm) after a change in labextension/"
	@echo "make bench           the benchmarks (table + JSON under benchmarks/results/)"
	@echo "make install         a system-wide install for every user (PREFIX=/opt/sandbox-kernel, BINDIR=/usr/local/bin)"

deps:
	@bash tools/install-deps.sh $(DEB_PACKAGES)

$(PY): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,demo]'
	@touch $(PY)

venv: deps $(PY)

$(RUNTIME): sandbox_kernel/runtime/native/sk-runtime.c sandbox_kernel/runtime/native/cflags
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_RT) -o $@ $<

native: $(RUNTIME)

# the JupyterLab extension: labextension/ built into sandbox_kernel/labextension/ (committed,
# so no install needs node; npm ci fetches the locked packages). Not part of `make test`:
# the unit tests check the committed build's stamp against the sources instead.
labextension: venv
	$(PY) tools/labextension.py build

# a system-wide install every user's Jupyter can use (root; see tools/install-system.sh)
PREFIX ?= /opt/sandbox-kernel
BINDIR ?= /usr/local/bin
install: deps
	bash tools/install-system.sh $(PREFIX) $(BINDIR)

demo: venv native
	$(PY) -m sandbox_kernel.jupyter.demo

# a teaching hub on this machine: two students and an instructor (root; tools/hub-demo.sh)
hub-demo: deps
	bash tools/hub-demo.sh

hub-demo-clean:
	bash tools/hub-demo.sh --clean

lint: venv lint-c
	$(VENV)/bin/ruff check sandbox_kernel tests tools benchmarks
	$(VENV)/bin/ruff format --check sandbox_kernel tests tools benchmarks
	$(VENV)/bin/mypy

# the native executor: clang-format --dry-run -Werror, extra gcc warnings, clang-tidy, cppcheck
lint-c: deps
	bash tools/lint-c.sh

test-unit: venv native
	bash tools/pytest-run.sh $(PY) tests/unit

test-unit-matrix: venv
	bash tools/unit-matrix.sh

# the guest kernel and initramfs for the cgroup v2 venue (cached under .vm/)
vm-setup:
	bash tools/vm/setup.sh

# A failing browser test leaves its screenshot, the page's console and the server's log in
# test-artifacts/ (which CI keeps); the hub phase of test-rootless keeps the hub's log there,
# and the screenshot beside it on a failure. A variable already set (even empty) is kept.
ARTIFACTS := $(CURDIR)/test-artifacts
test-privileged: export SANDBOX_KERNEL_TEST_ARTIFACTS ?= $(ARTIFACTS)
test-rootless: export SANDBOX_KERNEL_HUB_KEEP_LOG ?= $(ARTIFACTS)/hub.log

test-privileged: venv native vm-setup
	@[ -z "$$SANDBOX_KERNEL_TEST_ARTIFACTS" ] || mkdir -p "$$SANDBOX_KERNEL_TEST_ARTIFACTS"
	bash tools/pytest-run.sh $(PY) tests/privileged tests/security

# the runtime, provisioner, magics and security suites again, with the server as an
# unprivileged user (with and without a subordinate id range); needs the images the
# privileged suite built into the system store
test-rootless: venv native vm-setup
	@[ -z "$$SANDBOX_KERNEL_HUB_KEEP_LOG" ] || mkdir -p "$$(dirname "$$SANDBOX_KERNEL_HUB_KEEP_LOG")"
	bash tools/rootless-tests.sh

test-cgroup-v2: venv native vm-setup
	bash tools/vm/run-tests.sh $(CGROUP_V2_ARGS)

# the same selection directly on a pure cgroup v2 host (no VM)
test-cgroup-v2-native: venv native
	bash tools/vm/run-tests.sh --native $(CGROUP_V2_ARGS)

test: venv native lint test-unit test-unit-matrix test-privileged test-rootless test-cgroup-v2
	@echo "make test: all suites passed"

# rootless start and setup against root mode (makes a test user; see tools/rootless-tests.sh)
bench-rootless: venv native
	bash tools/rootless-tests.sh --bench

bench: venv native
	$(PY) -m benchmarks

clean:
	rm -rf build dist *.egg-info sandbox_kernel/runtime/_bin test-artifacts
