"""The frozen generator stack: any-order LlamaGen GPT, VQ tokenizer, data, block geometry and orders."""
