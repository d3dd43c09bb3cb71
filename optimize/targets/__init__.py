"""Inference backends: one module per backend, named by the registry, imported only when used."""
