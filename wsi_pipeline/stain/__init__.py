"""Stain normalization (Macenko)."""
