"""Tumour-vs-benign tile classifier: CNN definition, training, ONNX export, evaluation, model card.

Not part of the installed ``wsi_pipeline`` package. Run the entry points from the repository root
(the README's "Training your own model" gives the shipped model's full commands)::

    python -m models.train  --index ../shared/data/tiles/lc25000-lung/index.csv \
        --glas ../shared/data/tiles/glas-colon --augment scanner --out models/runs/X
    python -m models.export --checkpoint models/runs/X/best.pt --out models/runs/X/tumour-cnn.onnx
    python -m models.evaluate --model models/tumour-cnn.onnx --check
    python -m models.compare --split val models/runs/*/tumour-cnn.onnx
    python -m models.ood_check --model models/tumour-cnn.onnx

Modules ``split``, ``augment``, ``data``, ``scanned`` (GlaS, CoNSeP, Kather tiles), ``mix``
(training batches), ``ood``, ``card`` (MODEL_CARD.md), ``evaluate``, ``compare`` and ``ood_check``
need numpy, Pillow and onnxruntime only; ``net``, ``train`` and ``export`` need torch (the ``train``
extra). The card JSON (schema, loading, writing) and the metrics are the installed package's:
``wsi_pipeline.inference.card`` and ``wsi_pipeline.evaluation.metrics``.
"""

from __future__ import annotations

CLASSES: tuple[str, str] = ("non-tumour", "tumour")
POSITIVE_CLASS = "tumour"
TILE_PX = 224
