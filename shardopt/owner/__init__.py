"""Adafactor and Muon, sharded by whole tensors: each parameter updated on one owner rank (``OwnedOptimizer``)."""
