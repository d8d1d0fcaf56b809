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
# through DVC's Hydra composition (conf/): `dvc exp run -S profile=demo` writes
# params.yaml from conf/profile/demo.yaml and runs what is out of date. The mirror is
# deterministic: these arguments give the md5s written in the demo profile.
DEMO_MIRROR := data/demo/mirror
DEMO_MIRROR_ARGS := --train 1000 --val 100 --max-side 160 --seed 0
DEMO_REPORTS := reports/fcn32s/metrics.json reports/fcn16s/metrics.json reports/fcn8s/metrics.json

demo: $(STAMP)
	@start=$$(date +%s); \
	export PATH="$(CURDIR)/$(BIN):$$PATH"; \
	fcn demo-data --out $(DEMO_MIRROR) $(DEMO_MIRROR_ARGS) >/dev/null && \
	dvc exp run -S profile=demo && \
	echo && dvc metrics show $(DEMO_REPORTS) && \
	echo && cat reports/evaluation.md && \
	echo && python -c 'import json; r = json.load(open("reports/registry.json")); print("registry:", r["decision"], "version", r["new_version"], "| champion: version", r["champion_version"], "mean IU", round(r["champion_mean_iu"], 4))' && \
	echo && echo "demo finished in $$(( $$(date +%s) - start )) s" && \
	echo "MLflow UI (runs, registered model): make mlflow-ui (it prints the addresses to open)" && \
	echo "Share the run: git add dvc.lock params.yaml && git commit, then dvc push (docs/TRACKING.md: the DVC remote)"

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
