"""Predictions against expert annotations: parsing, metrics, evaluate."""
