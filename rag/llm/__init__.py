"""Our own decoder-only language model: tokenizer, model, KV cache, generation, training."""
