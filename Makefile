# Two commands on a fresh machine: `make run` and `make test` (`make bench` measures performance).
# EXTRA=gpu installs TensorFlow with CUDA instead of the CPU-only wheel. A venv holds one EXTRA: make refuses to
# install into one set up with the other (`make clean` first, or name another one: VENV=.venv-gpu EXTRA=gpu).
PYTHON ?= python3
VENV ?= .venv
EXTRA ?= cpu
ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(EXTRA)
# make test also installs the JAX and torch backends (CPU builds, about 1.2 GB) for tests/test_backends.py,
# Ray for tests/test_scaleout.py, and MLflow (its server too) for tests/test_tracking.py.
TEST_STAMP := $(VENV)/.installed-$(EXTRA)-backends
# tensorflow[and-cuda] installed beside tensorflow-cpu (or the reverse) is a broken mix. Checked when a recipe that
# installs is about to run, with $(error): one line on stderr (a failing shell command adds make's own "Error 1").
OTHER_STAMP = $(firstword $(wildcard $(patsubst %,$(VENV)/.installed-%,$(filter-out $(EXTRA),cpu gpu))))
CLEAN_VENV = make clean$(if $(filter-out .venv,$(VENV)), VENV=$(VENV))
MIXED_EXTRAS = $(VENV) was set up with EXTRA=$(OTHER_STAMP:$(VENV)/.installed-%=%); run '$(CLEAN_VENV)' first \
(or give EXTRA=$(EXTRA) a venv of its own: make ... VENV=$(VENV)-$(EXTRA) EXTRA=$(EXTRA))
REFUSE_MIXED_EXTRAS = $(if $(OTHER_STAMP),$(error $(MIXED_EXTRAS)))

.PHONY: run test test-fast bench docs setup clean gpu-check-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(REFUSE_MIXED_EXTRAS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),dev]"
	touch $(STAMP)

# One pip run for everything the tests need (a second resolve of the same packages costs CI a minute).
$(TEST_STAMP): pyproject.toml
	@$(REFUSE_MIXED_EXTRAS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRA),dev,backends,ray,mlflow]"
	touch $(STAMP) $(TEST_STAMP)

run: $(STAMP)
	$(BIN)/emnist-cnn run $(ARGS)

# Two test processes, each taking whole test files (a file's shared runs are trained once): most tests
# wait on process start-up and Keras tracing, which the other process overlaps. TEST_JOBS=0: one process.
TEST_JOBS ?= 2

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(ARGS)

# The inner loop: every test that trains no model (those marked `trains` are left out), about 3 minutes.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder -m "not trains" $(ARGS)

# The documentation site, built strictly into site/ (open site/index.html; `$(BIN)/mkdocs serve` rebuilds as you
# edit). `make test` builds it too (tests/test_docs.py).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --site-dir site

# Throughput, efficiency and memory figures (about 3 minutes on 2 idle cores); ARGS="--quick", "--json PATH", "--only KEY".
# BENCH=recipes compares the training recipes on the real MNIST digits in ../shared (benchmarks/recipes.py).
# Each writes its figures to a dated JSON file under benchmarks/results/ (the files the README quotes).
BENCH ?= bench
bench: $(STAMP)
	$(BIN)/python -m benchmarks.$(BENCH) $(ARGS)

# The wheels benchmarks/gpu_check.sh carries to a GPU machine that has JAX but no Keras (README, "GPU check"):
# Keras as installed here and the two of its dependencies such a machine lacks, for Python 3.12.
gpu-check-wheels: $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
	  $$($(BIN)/python -c 'from importlib.metadata import version as v; print(*(f"{p}=={v(p)}" for p in ("keras", "namex", "optree")))')

clean:
	rm -rf $(VENV) build site src/*.egg-info
