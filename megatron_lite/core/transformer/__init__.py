"""Transformer building blocks beyond the GPT model's own: mixture of experts."""
