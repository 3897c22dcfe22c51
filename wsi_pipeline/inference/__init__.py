"""The model: card, onnxruntime sessions, scoring tiles through Dask."""
