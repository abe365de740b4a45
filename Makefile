# Everything runs inside a project-local virtualenv so a fresh machine needs only Python 3.11+.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INDEX ?= index
API_PORT ?= 8000
UI_PORT ?= 8501
UI_HOST ?= 127.0.0.1
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

# The documentation is the demo corpus (its Markdown only: docs/img holds pictures).
ingest: install
	$(BIN)/rag ingest $(wildcard docs/*.md) --index $(INDEX)

# The API and the web UI, both on this machine only, from one process (`rag serve --ui`): a port in
# use stops it at once with one line, and the UI starts only once the API answers. Ctrl-C stops both.
# Admin endpoints (ingest, delete) need RAG_API_KEY set: `RAG_API_KEY=secret make run`. To serve the
# UI to other machines: `make run UI_HOST=0.0.0.0` (its admin page then asks for the key).
run: ingest
	$(BIN)/rag serve --index $(INDEX) --host 127.0.0.1 --port $(API_PORT) --ui --ui-host $(UI_HOST) --ui-port $(UI_PORT)

# The reader, our own LLM, trained here. Without a GPU (the default): the CPU recipe, all-MiniLM-L6-v2
# (the embedding model's own weights) warm-started as a prefix-LM with a copy head, fine-tuned on
# SQuAD span rows (~2.5 h on 2 cores; `make reader` again resumes an interrupted run), exported as
# fp16 to models/reader, its abstention margin calibrated and the result evaluated. With a GPU
# (READER_PRESET=default, RAG_DEVICE=cuda): the from-scratch recipe, pretraining on Gutenberg then
# SFT. `make run`, `rag ask` and POST /v1/ask find the reader in models/reader.
SHARED ?= $(or $(RAG_SHARED_DATA),../shared/data)
READER_PRESET ?= $(shell $(BIN)/python -c "import torch; print('default' if torch.cuda.is_available() else 'minilm-reader')" 2>/dev/null || echo minilm-reader)
READER_LIMIT ?= 40000
READER_RUN ?= runs/reader-$(READER_PRESET)
MODEL_DIR ?= models/reader
reader: install
ifeq ($(READER_PRESET),minilm-reader)
	test -f $(READER_RUN)/spans.jsonl || $(BIN)/rag train span-data \
		--squad $(SHARED)/squad/train-v1.1.json.gz --out $(READER_RUN)/spans.jsonl
	$(BIN)/rag train reader --data $(READER_RUN)/spans.jsonl --out $(READER_RUN)/sft \
		$(if $(wildcard $(READER_RUN)/sft/train_state.pt),--resume)
	$(BIN)/rag train export --run $(READER_RUN)/sft --out $(MODEL_DIR)
	$(BIN)/rag eval reader --model $(MODEL_DIR) --squad $(SHARED)/squad/dev-v1.1-part-a.json \
		--limit 500 --calibrate 1000 --save-calibration
else
	$(BIN)/rag train lm --preset $(READER_PRESET) --out $(READER_RUN)/lm
	$(BIN)/rag train reader-data --squad $(SHARED)/squad/train-v1.1.json.gz --model $(READER_RUN)/lm \
		--limit $(READER_LIMIT) --out $(READER_RUN)/sft.jsonl
	$(BIN)/rag train sft --preset $(READER_PRESET) --init $(READER_RUN)/lm --data $(READER_RUN)/sft.jsonl \
		--out $(READER_RUN)/sft
	$(BIN)/rag train export --run $(READER_RUN)/sft --out $(MODEL_DIR) --no-fp16
	$(BIN)/rag eval reader --model $(MODEL_DIR) --limit 500
endif

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
