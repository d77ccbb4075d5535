# Two commands a user needs: `make demo` (the main job) and `make test`. Both build .venv from nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build from the local index, never a multi-GB CUDA resolve.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	# DeepSpeed for tests/test_deepspeed.py (ZeRO on CPU): no compiled ops, built against the torch above.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation deepspeed==0.19.8
	rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/calibrl demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

test-fast: $(STAMP)  # the unit tests only (no training runs, no subprocesses): a quick check while editing
	$(BIN)/python -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) runs .cache
