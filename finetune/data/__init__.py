"""Datasets: sources, prompt strategies, chat templates, tokenization, packing, the cache."""
