"""Shared model definitions (Llama 4 text and dense Llama) and the weights format."""
