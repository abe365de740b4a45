# Everything runs inside a project-local virtualenv so a fresh machine needs only Python 3.11+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INDEX ?= index
API_PORT ?= 8000
UI_PORT ?= 8501
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test bench lint ingest reader clean

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
	RAG_INDEX_DIR=$(INDEX) $(BIN)/uvicorn app.api:app --host 127.0.0.1 --port $(API_PORT) --timeout-graceful-shutdown 5 & api=$$!; \
	trap "kill $$api" EXIT INT TERM; \
	RAG_API_URL=http://127.0.0.1:$(API_PORT) $(BIN)/streamlit run app/ui.py --server.port $(UI_PORT) \
		--server.headless true --browser.gatherUsageStats false

# The reader, our own LLM: pretrained on the Gutenberg corpus, then fine-tuned (SFT) to answer
# SQuAD questions from numbered sources with [n] citations; copied to models/reader, where
# `make run`, `rag ask` and POST /v1/ask find it. READER_PRESET=default wants a GPU (add
# RAG_DEVICE=cuda); READER_PRESET=tiny is a quick CPU run of the recipe, not a useful reader.
SHARED ?= $(or $(RAG_SHARED_DATA),../shared/data)
READER_PRESET ?= default
READER_LIMIT ?= 40000
READER_RUN ?= runs/reader-$(READER_PRESET)
MODEL_DIR ?= models/reader
reader: install
	$(BIN)/rag train lm --preset $(READER_PRESET) --out $(READER_RUN)/lm
	$(BIN)/rag train reader-data --squad $(SHARED)/squad/train-v1.1.json.gz --model $(READER_RUN)/lm \
		--limit $(READER_LIMIT) --out $(READER_RUN)/sft.jsonl
	$(BIN)/rag train sft --preset $(READER_PRESET) --init $(READER_RUN)/lm --data $(READER_RUN)/sft.jsonl \
		--out $(READER_RUN)/sft
	rm -rf $(MODEL_DIR).new && mkdir -p $(MODEL_DIR).new
	cp $(READER_RUN)/sft/model.safetensors $(READER_RUN)/sft/config.json $(READER_RUN)/sft/tokenizer.json $(MODEL_DIR).new/
	rm -rf $(MODEL_DIR) && mv $(MODEL_DIR).new $(MODEL_DIR)
	$(BIN)/rag eval reader --model $(MODEL_DIR) --limit 500

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
