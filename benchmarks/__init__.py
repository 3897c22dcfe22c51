"""Benchmarks: run each as a module from the repository root, e.g. ``python -m benchmarks.bench_model``.

Being a package run with ``-m`` puts the repository root on ``sys.path``, so ``models`` and ``testkit``
(folders of the checkout, not installed) import without path edits.
"""
