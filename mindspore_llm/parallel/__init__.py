"""Parallel configuration and the sharding plan: the only code that knows how a model is split."""
