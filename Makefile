# Every target does its own set-up on a fresh machine: a venv holding the exact versions the suite last passed
# with (constraints.txt, the lock: torch is the CPU build, since an unpinned torch pulls a multi-GB CUDA build,
# and Triton is pinned because the kernel tests run in its CPU interpreter), the project, the demo assets (cached).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
LOCK    := constraints.txt
OLDEST  := constraints-oldest.txt
EXTRAS  := dev,bench,sign,serve
STAMP   := $(VENV)/.lowbit-installed
WORKERS ?= 2
# The torch that `make lock` keeps: the CPU build this project's machines hold on disk. Bump it here, then make lock.
LOCK_TORCH ?= torch==2.13.0
# test-latest's torch: the newest pyproject allows (where no CPU build is on disk, pip fetches a CUDA build).
LATEST_TORCH ?= torch

.PHONY: setup assets test test-fast demo test-latest test-oldest lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	touch $(STAMP)

assets: setup
	$(VENV)/bin/lowbit assets

# pytest-xdist workers, one per core of CI's two (make test WORKERS=N elsewhere); the demo model's tests share a
# worker (their xdist_group), so it is compiled once.
test: assets
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup tests

# The suite without the tests marked slow (the demo model's, the sweeps over every model family, those over 10 s).
test-fast: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup -m "not slow" tests

demo: assets
	$(PY) -m bench.demo

# In a fresh venv $(1): lowbit doctor, the demo assets, the suite and the demo. Not in CI.
define suite_in
	$(1)/bin/lowbit doctor
	$(1)/bin/lowbit assets
	$(1)/bin/python -m pytest -q -n $(WORKERS) --dist loadgroup tests
	$(1)/bin/python -m bench.demo
endef

# The newest versions pyproject allows, so drift is found by a command; what was installed is kept in
# .venv-latest/tested.txt (make lock turns it into the lock).
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade '$(LATEST_TORCH)' -e '.[$(EXTRAS)]'
	.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/tested.txt
	$(call suite_in,.venv-latest)

# The oldest versions pyproject allows (its lower bounds, pinned in constraints-oldest.txt; everything else newest).
# Without the bench extra: onnxruntime-genai needs a newer onnxruntime than lowbit does.
test-oldest:
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q -c $(OLDEST) -e '.[dev,serve]'
	$(call suite_in,.venv-oldest)

# Refresh the lock: test-latest with the lock's torch, then its versions (local build labels dropped, so the
# lock also resolves where only PyPI's builds exist) become constraints.txt.
lock:
	$(MAKE) test-latest LATEST_TORCH='$(LOCK_TORCH)'
	{ echo "# The versions make test and make demo last passed with: written by make lock, used by make setup (CI)."; \
	  sed -E 's/^([^=]+==[^+]+)\+.*/\1/' .venv-latest/tested.txt; } > $(LOCK)

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest out .pytest_cache
