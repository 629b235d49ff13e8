"""Metrics and evaluation: torchmetrics collections whose state can be merged across clients."""
