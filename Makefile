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

# API in the background, the web UI in the foreground; Ctrl-C stops both.
# Admin endpoints (ingest, delete) need RAG_API_KEY set: `RAG_API_KEY=secret make run`.
run: ingest
	RAG_INDEX_DIR=$(INDEX) $(BIN)/uvicorn app.api:app --host 127.0.0.1 --port $(API_PORT) & api=$$!; \
	trap "kill $$api" EXIT INT TERM; \
	RAG_API_URL=http://127.0.0.1:$(API_PORT) $(BIN)/streamlit run app/ui.py --server.port $(UI_PORT) \
		--server.headless true --browser.gatherUsageStats false

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
