"""The frozen generator stack: any-order LlamaGen GPT, VQ tokenizer, data, block geometry and orders.

Imports no other project module; never envs or agents.
"""

