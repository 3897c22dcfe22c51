"""Input and output at the edges: slide readers, the Zarr tile store, output writers."""
