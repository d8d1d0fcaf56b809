# Two entry points for a fresh machine: `make demo` (main job) and `make test`.
# Each creates .venv and installs the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench bench-gpu clean mlflow-ui serve

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

# The demo: the pipeline's own stages (dvc.yaml) on a generated VOC/SBD mirror, offline,
# on one local Ray head: `fcn demo` (pipelines/commands/demo.py) writes the mirror, starts
# the head and runs `dvc exp run -S profile=demo` (DVC's Hydra composition writes
# params.yaml from conf/profile/demo.yaml), then shows the table and where the time went.
demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/fcn demo

# The MLflow UI over the project's store, on 127.0.0.1 only; prints the address of the runs.
mlflow-ui: $(STAMP)
	$(BIN)/fcn ui

# The champion as a REST endpoint on 127.0.0.1:5001 (docs/SERVING.md).
serve: $(STAMP)
	$(BIN)/fcn serve

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_models.py

# On a machine with a CUDA GPU: forward and training step by precision, layout and compilation.
bench-gpu: $(STAMP)
	$(BIN)/python bench/bench_gpu.py

clean:
	rm -rf $(VENV)
