"""The frozen generator: the LlamaGen-compatible any-order GPT (KV cache, query rows), the VQ
tokenizer, sampling, block geometry and heuristic orders, and loading a backbone from a config."""
