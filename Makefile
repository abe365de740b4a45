# Everything runs inside a project-local virtualenv so a fresh machine needs only Python 3.11+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INDEX ?= index
API_PORT ?= 8000
UI_PORT ?= 8501
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test bench lint ingest clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(VENV)/.installed

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[dev]'
	touch $@

ingest: install
	$(BIN)/rag ingest docs --index $(INDEX)

run: ingest
	$(BIN)/rag serve --index $(INDEX) --port $(API_PORT) --ui-port $(UI_PORT)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/rag bench ingest
	$(BIN)/rag bench search
	$(BIN)/rag bench memory
	$(BIN)/rag bench llm

lint: install
	$(BIN)/ruff check rag app tests bench
	$(BIN)/ruff format --check rag app tests bench

clean:
	rm -rf $(VENV) $(INDEX)/*
