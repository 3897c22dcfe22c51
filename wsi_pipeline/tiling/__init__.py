"""Slide to tiles: tissue mask, tile grid, plan, tile streaming."""
