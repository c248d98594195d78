# Two entry points: `make demo` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast setup fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first, so that nothing below pulls the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# Every fixture the tests use (the demo builds only the one it needs).
fixtures: $(STAMP)
	$(BIN)/compress fixtures

demo: $(STAMP)
	$(BIN)/compress fixtures --only sentiment-classifier
	$(BIN)/compress run recipes/minilm-sentiment-int8-dynamic.yaml \
		--model "$$($(BIN)/compress fixtures --only sentiment-classifier --path)" --out runs/demo

# The whole suite, shipped recipes on the real models included (what CI runs). Two workers: much of
# the work (ONNX Runtime's quantizers, exporters, numpy) uses one core, so the SmolLM2 recipes and
# everything else overlap on a 2-core machine; tests of one model share a worker (xdist_group).
WORKERS ?= 2
test: fixtures
	$(BIN)/python -m pytest -q -ra -n $(WORKERS) --dist loadgroup --durations=15

# Unit tests on tiny models only: no fixture is built, a few minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not integration"

clean:
	rm -rf $(VENV) runs .pytest_cache
