# Two entry points for a fresh machine: `make demo` (install + main job) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first: any other spec pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	# A real pre-trained CNN for tests and benchmarks: only the ONNX files of this wheel are used, so not its
	# dependencies (OpenCV, Shapely, pyclipper).
	$(BIN)/pip install --quiet --no-deps rapidocr-onnxruntime==1.4.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qcompile minilm --passes rotate,w8a8 --backend ort -o out/minilm --force
	$(BIN)/qcompile eval minilm out/minilm --data qcompiler/data/heldout.txt

test: $(STAMP)
	# Two workers: the suite is mostly single-threaded Python (capture, passes), and CI has two cores.
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/fidelity.py
