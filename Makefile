# One-line entry points for a fresh clone: `make run` (default matrix) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Where pip finds the CPU build when no local wheel of it is on the machine.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=
# `make test` runs the test files on this many pytest-xdist workers (each file's tests on one
# worker, so module fixtures are shared); 0 runs them in this process, one after the other.
TEST_WORKERS ?= 2
# The versions `make setup` installs: resolved together once and tested (`make lock` resolves them
# again). Without it a fresh install backtracks through old aiobotocore and s3fs releases (sagemaker's
# s3fs against boto3's botocore), building 19 source archives, for over two minutes.
# Pinned on Python LOCK_PYTHON; other Pythons resolve afresh (LOCK=/dev/null: no pins).
LOCK_PYTHON := 3.11
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
LOCK ?= $(if $(filter $(LOCK_PYTHON),$(PY_VERSION)),constraints.txt,/dev/null)
# uv resolves, downloads and compiles in parallel: the install below took 1 min 18 s against pip's
# 3 min 12 s here. It reads PyPI (or UV_INDEX_URL), not pip's configuration: INSTALLER=pip where only
# pip reaches your package index.
INSTALLER ?= uv
INSTALL = $(if $(filter uv,$(INSTALLER)),$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode,$(BIN)/pip install)

.PHONY: setup browser engines run lint test test-quick test-containers test-gpu bench-gpu gpu-evidence gpu-wheels lock clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml Makefile $(filter-out /dev/null,$(LOCK))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "setuptools>=68" wheel $(filter uv,$(INSTALLER))
	@if nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch $(TORCH_VERSION) (CUDA build)"; \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing torch $(TORCH_VERSION) (CPU build)"; \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		$(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	fi
	DS_BUILD_OPS=0 $(INSTALL) -q -c $(LOCK) --no-build-isolation "deepspeed>=0.17"
	$(INSTALL) -q -c $(LOCK) -e ".[dev,track]"
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
	touch $@

# Debian's Chromium, for the test that opens report.html in a browser (Playwright drives it;
# no browser is downloaded). Installed when missing and apt-get can run; otherwise that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing Debian's chromium for the report's browser test"; \
			(apt-get install -y -q chromium >/dev/null 2>&1 || \
			 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || \
			echo "could not install chromium: the browser test will skip"; \
		else echo "chromium not found and apt-get not usable: the browser test will skip"; fi; }

# Debian's container and build tools for the container tests (podman with runc, debootstrap for a
# base image without any registry; strace lets the Kubernetes test check that nothing leaves
# loopback), and Slurm with munge for the tests that start a one-node Slurm cluster of their own
# (tests/engines/slurm.py). Installed when missing and apt-get can run; otherwise those tests skip.
ENGINE_PACKAGES := podman buildah runc debootstrap uidmap fuse-overlayfs slirp4netns containernetworking-plugins strace \
	slurm-wlm slurm-client munge
engines:
	@missing=$$(for p in $(ENGINE_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's $$(echo $$missing) for the container and Slurm tests"; \
		(apt-get install -y -q $$missing >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $$missing >/dev/null 2>&1)) || \
		echo "could not install $$(echo $$missing): the container and Slurm tests will skip"; \
	else echo "$$(echo $$missing) not installed and apt-get not usable: the container and Slurm tests will skip"; fi

run: setup
	$(BIN)/python flows/finetune_matrix.py run

# Ruff: pyflakes, pycodestyle, import order, bugbear, pyupgrade (pyproject.toml).
lint: setup
	$(BIN)/ruff check .

test: setup browser
	$(BIN)/python -m pytest -m "not gpu and not containers" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 $(PYTEST_ARGS)

# The cells in real containers (tests marked `containers`): the CPU image on a local Debian base
# (make image-base, make image), one cell's trainer run in it by hand, and a matrix through the
# flow on AWS Batch (moto and podman in a network namespace of the test's own). The image is built
# first, outside the tests (it needs the package index and the Debian mirror; the tests send nothing
# beyond loopback); CI runs this after `make test`.
test-containers: setup engines
	CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/tests/engines/containers.conf} $(BIN)/python -m tests.engines.image
	CONTAINERS_CONF=$${CONTAINERS_CONF:-$(CURDIR)/tests/engines/containers.conf} \
		$(BIN)/python -m pytest -m "containers and not gpu" --durations=30 $(PYTEST_ARGS)

# The quick loop: everything but the slow tests (under a minute).
test-quick: setup browser
	$(BIN)/python -m pytest -m "not gpu and not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# On a machine with an NVIDIA GPU: the GPU checks (tests/test_gpu.py), and the GPU bench at real
# shapes (python -m steps.bench --device cuda), whose results go to reports/benchmarks/.
test-gpu: setup
	FINETUNE_MATRIX_TEST_THREADS=$$(nproc) $(BIN)/python -m pytest -m gpu --durations=30 $(PYTEST_ARGS)

bench-gpu: setup
	$(BIN)/python -m steps.bench --device cuda --save

# Every GPU number from one command, at most 9 minutes on an H100 (steps/report/evidence/): the GPU
# tests that matter most, the LoRA bench at 1.1B with and without the fast paths and lora_kernels
# against HF Trainer + PEFT, QLoRA vs LoRA at 7B, a matrix through the flow on local-gpu; results
# under reports/benchmarks/<date>-<gpu>/. No `setup`: on a bare GPU machine without internet it
# builds .venv-gpu over the image's CUDA torch from WHEELS (docs/performance.md).
# DRY=1: check every command line, file and import on any machine, run nothing (CI does).
WHEELS ?= wheelhouse
EVIDENCE_ARGS ?=
EVIDENCE_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-evidence:
	$(EVIDENCE_PYTHON) -m steps.report.evidence $(if $(DRY),--dry-run) --wheels $(WHEELS) $(EVIDENCE_ARGS)

# On a machine with internet: the wheels a CUDA PyTorch image lacks (Metaflow, pydantic,
# bitsandbytes, Liger Kernel) for its Python (GPU_PYTHON), into WHEELS, to copy beside the checkout.
GPU_PYTHON ?= 3.12
gpu-wheels:
	$(EVIDENCE_PYTHON) -m steps.report.evidence --download-wheels $(WHEELS) --gpu-python $(GPU_PYTHON)

# Resolve the dependencies afresh in a scratch environment and pin what it got (torch is
# TORCH_VERSION's, and CUDA's packages come with it). Run the tests on the new pins before committing.
lock:
	@test "$(PY_VERSION)" = "$(LOCK_PYTHON)" || { echo "the pins are for Python $(LOCK_PYTHON), not $(PY_VERSION)"; exit 1; }
	rm -rf $(VENV)-lock
	$(MAKE) setup VENV=$(VENV)-lock LOCK=/dev/null
	{ sed -n '/^#/p' constraints.txt; $(VENV)-lock/bin/pip freeze --exclude-editable | \
		grep -v -i -E '^(torch|nvidia-.*|triton|pip|setuptools|wheel|uv)==' | LC_ALL=C sort -f; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(VENV)-lock

clean-venv:
	rm -rf $(VENV)

# The image remote cells run in (Containerfile; docs/compute.md). `make image` builds it with
# podman, else docker: BASE= its base (default: the Containerfile's, a CUDA PyTorch image), TAG= its
# name. build/image/ gets what the build needs from this machine: its CA bundle (pip inside the
# build) and, for a base without torch, the CPU wheel of TORCH_VERSION (TORCH_WHEEL=FILE, else pip
# download: pip's own configuration, then TORCH_CPU_INDEX). `make image-base` builds a Debian
# bookworm base (python3, venv, CA certificates) with debootstrap from apt's Debian mirror, no
# image registry needed: `make image BASE=localhost/finetune-matrix-base:bookworm` is the CPU
# variant the tests run. `make image-push REGISTRY=<registry>/<path>` tags and pushes TAG.
# Where podman's defaults fail (crun on a low open-files hard limit, or hybrid cgroups), set
# CONTAINERS_CONF=tests/engines/containers.conf (runc, cgroupfs), as the container tests do.
.PHONY: image image-base image-push
ENGINE ?= $(if $(shell command -v podman 2>/dev/null),podman,docker)
IMAGE_VERSION := $(shell sed -n 's/^version *= *//p' setup.cfg)
TAG ?= finetune-matrix:$(IMAGE_VERSION)
BASE ?=
IMAGE_FROM = $(or $(BASE),$(shell sed -n 's/^ARG BASE=//p' Containerfile))
IMAGE_BUILD_ARGS ?= --network=host
TORCH_WHEEL ?=
CA_BUNDLE ?= $(firstword $(wildcard /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt))
IMAGE_PIP := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m pip
LOCAL_BASE := localhost/finetune-matrix-base:bookworm
DEBIAN_MIRROR ?= $(or $(shell sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v -e -security -e '^$$' | head -1),$(shell awk '$$1 == "deb" && !/-security/ { for (i = 2; i <= NF; i++) if ($$i ~ /^[a-z]+:\/\//) { print $$i; exit } }' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null),http://deb.debian.org/debian)

image:
	rm -rf build/image && mkdir -p build/image/wheels
	$(if $(CA_BUNDLE),cp $(CA_BUNDLE) build/image/ca-certificates.crt)
	@found=$$($(ENGINE) run --rm --network=none $(IMAGE_FROM) python3 -c \
		"import importlib.util as u, platform, sys; print('torch' if u.find_spec('torch') else '%d.%d %s' % (*sys.version_info[:2], platform.machine()))") || \
		{ echo "could not run python3 in $(IMAGE_FROM)"; exit 1; }; \
	if [ "$$found" = torch ]; then echo "$(IMAGE_FROM) has torch: kept"; \
	else set -- $$found; echo "$(IMAGE_FROM) has no torch: the CPU wheel of torch $(TORCH_VERSION) for Python $$1 ($$2)"; \
		if [ -n "$(TORCH_WHEEL)" ]; then cp "$(TORCH_WHEEL)" build/image/wheels/; \
		else $(IMAGE_PIP) download -q --no-deps --only-binary :all: --python-version $$1 --platform manylinux_2_28_$$2 \
			-d build/image/wheels "torch==$(TORCH_VERSION)+cpu" 2>/dev/null || \
		     $(IMAGE_PIP) download -q --no-deps --only-binary :all: --python-version $$1 --platform manylinux_2_28_$$2 \
			-d build/image/wheels --index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_VERSION)+cpu"; fi; \
		ls build/image/wheels/torch-*.whl; fi
	$(ENGINE) build $(IMAGE_BUILD_ARGS) -f Containerfile $(if $(BASE),--build-arg BASE=$(BASE)) -t $(TAG) .
	@echo "built $(TAG)"

image-base:
	@test "$$(id -u)" = 0 || { echo "image-base: debootstrap needs root"; exit 1; }
	@command -v debootstrap >/dev/null || { echo "image-base: debootstrap is missing (apt-get install debootstrap)"; exit 1; }
	rm -rf build/image-base && mkdir -p build/image-base
	debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm build/image-base/root $(DEBIAN_MIRROR)
	rm -rf build/image-base/root/var/cache/apt/archives/*.deb build/image-base/root/var/lib/apt/lists/*
	tar -C build/image-base/root -c . | $(ENGINE) import --change 'CMD ["/bin/bash"]' - $(LOCAL_BASE)
	rm -rf build/image-base
	@echo "built $(LOCAL_BASE) from $(DEBIAN_MIRROR)"

image-push:
	@test -n "$(REGISTRY)" || { echo "usage: make image-push REGISTRY=<registry>/<path> [TAG=$(TAG)]"; exit 1; }
	$(ENGINE) tag $(TAG) $(REGISTRY)/$(lastword $(subst /, ,$(TAG)))
	$(ENGINE) push $(REGISTRY)/$(lastword $(subst /, ,$(TAG)))
	@echo "matrix: remote: {image: $(REGISTRY)/$(lastword $(subst /, ,$(TAG)))}"
