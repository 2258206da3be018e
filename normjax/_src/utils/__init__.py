"""Utilities that work on Flax variable trees: freezing, folding, precise statistics, replicas, optax, torch."""
