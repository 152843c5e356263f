# The two set-up commands of the README. Both work on a fresh clone with only python3 and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_OUT ?= results/demo

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/ntkdist run --data sphere --n 8000 --d 64 --depth 3 --seed 0 --store $(DEMO_OUT).zarr --out $(DEMO_OUT)

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,hpc]'
	$(BIN)/python -m pytest -q
