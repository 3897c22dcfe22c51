"""The ``wsi-infer`` command line."""

from wsi_pipeline.cli.commands import main

__all__ = ["main"]
