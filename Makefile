# Two entry points: `make demo` and `make test`. Each does all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-recipes setup fixtures peer-llm peer-optimum gpu-wheels clean

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

# The suite CI runs: unit tests, and shipped recipes on the real models, one recipe per kind of stage
# (ONNX int8 dynamic and static, torch int4 GPTQ, SparseGPT, LoRA, structured pruning). One process: two
# test workers on two cores measured slower (torch's and ONNX Runtime's threads spin while they wait).
test: fixtures
	$(BIN)/python -m pytest -q -ra --durations=15 -m "not every_recipe"

# Every test, every shipped recipe end to end included (about 20 minutes on 2 cores).
test-recipes: fixtures
	$(BIN)/python -m pytest -q -ra --durations=15

# Unit tests on tiny models only: no fixture is built, a few minutes.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m "not integration"

# llm-compressor in its own virtualenv: it pins transformers 5.15-5.17, beside compress's 5.24.
# benchmarks/peer_llm.py runs it there.
PEER_LLM := .venv-peer-llm
$(PEER_LLM)/.installed:
	$(PYTHON) -m venv $(PEER_LLM)
	$(PEER_LLM)/bin/pip install -q --upgrade pip
	$(PEER_LLM)/bin/pip install -q torch==2.13.0
	$(PEER_LLM)/bin/pip install -q llmcompressor==0.14.0.1 compressed-tensors==0.19.0 numpy safetensors
	touch $@

peer-llm: $(PEER_LLM)/.installed

# Optimum's ONNX exporter and quantizer (optimum-onnx 0.1.0, transformers < 4.58) for the benchmarks that
# compare against them (benchmarks/optimum_worker.py runs there).
PEER_OPTIMUM := .venv-peer-optimum
$(PEER_OPTIMUM)/.installed:
	$(PYTHON) -m venv $(PEER_OPTIMUM)
	$(PEER_OPTIMUM)/bin/pip install -q --upgrade pip
	$(PEER_OPTIMUM)/bin/pip install -q torch==2.13.0
	$(PEER_OPTIMUM)/bin/pip install -q optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 \
		onnx==1.23.2 onnxruntime==1.32.0 datasets==4.8.5 numpy
	touch $@

peer-optimum: $(PEER_OPTIMUM)/.installed

# The wheels the lent GPU machine lacks (it has no network), for benchmarks/gpu_check.sh: compress's pins but
# torch, for CPython 3.12, into gpu-wheels/ (ignored; carried along with the tree, 64 MiB together).
# docs/SERVING.md gives the device call.
gpu-wheels:
	$(PYTHON) benchmarks/gpu_wheels.py --out gpu-wheels

clean:
	rm -rf $(VENV) $(PEER_LLM) $(PEER_OPTIMUM) runs .pytest_cache
