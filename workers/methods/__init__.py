"""Merge methods: pure tensor math (elementwise.py, spectral.py, streaming_stats.py) and the registry that binds
each method's parameters to the per-tensor rule the streaming executor calls (registry.py)."""
