# Every target does its own set-up on a fresh machine: a venv, torch pinned to the local CPU build first
# (an unpinned torch pulls a multi-GB CUDA build), the project, then the demo assets (cached). Triton is
# pinned too: the kernel tests run in its CPU interpreter, whose behaviour moves between releases.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.9.0
STAMP  := $(VENV)/.lowbit-installed
WORKERS ?= 2

.PHONY: setup assets test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(TRITON)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

assets: setup
	$(VENV)/bin/lowbit assets

# pytest-xdist workers, one per core of CI's two (make test WORKERS=N elsewhere); the demo model's tests share a
# worker (their xdist_group), so it is compiled once.
test: assets
	$(PY) -m pytest -q -n $(WORKERS) --dist loadgroup tests

demo: assets
	$(PY) bench/demo.py

clean:
	rm -rf $(VENV) out .pytest_cache
