"""How prepared batches reach a session: a plain ``session.run`` on the CPU, I/O binding on a GPU.

On the CPU a batch is already where the model runs: ``session.run`` on the numpy array is as fast as
a binding (alternated runs: TileNet 945 vs 941 tiles/s at batch 64, ResNet-18 132.9 vs 132.5). On
CUDA/TensorRT every ``session.run`` copies its input from pageable host memory to the device and its
outputs back; :class:`BoundRunner` instead binds the input from a host buffer of its own,
page-locked (pinned) when onnxruntime can allocate one for the provider's device (copies from pinned
memory run at the bus's full rate, without a staging copy), and binds the outputs to host memory.
Each thread that runs batches gets its own binding and buffers (a session is safe to run from
several threads, a binding is not).

A batch shorter than the largest one run so far (a slide's last batch) is padded up to it with
copies of its last tile, and only its own rows are returned: a GPU then sees one batch shape (two,
with the short first batch of a stream), so cuDNN does not search its algorithms again and TensorRT
does not rebuild its engine for every slide's last batch.

Whether the input was pinned, and why not, is recorded (:meth:`BoundRunner.describe`) in the run
manifest: a pageable buffer is slower, never a different result. A binding whose first run fails
where ``session.run`` of the same batch on the same device works is given up for plain runs, and
that is recorded too; an error that ``session.run`` also raises is the run's error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from wsi_pipeline.inference.card import ModelCard
from wsi_pipeline.inference.session import run_prepared, to_probabilities

#: (probabilities (n, n_classes) float32, OOD distances (n,) or None) for one prepared batch
RunFn = Callable[[np.ndarray], "tuple[np.ndarray, np.ndarray | None]"]

#: host buffers kept per thread and input shape (the full batch and a stream's short first batch;
#: shorter last batches are padded to the full one)
MAX_BUFFERS = 4


def host_memory_info(provider: str) -> tuple[Any, str]:
    """onnxruntime's memory info for page-locked host memory of ``provider``'s device, or None with
    the reason (onnxruntime too old for device memory infos, no such device, no such memory)."""
    try:
        import onnxruntime as ort

        devices = ort.get_ep_devices()
        kind = ort.OrtDeviceMemoryType.HOST_ACCESSIBLE
    except (ImportError, AttributeError) as exc:
        return None, f"onnxruntime {_ort_version()} cannot allocate device host memory ({exc})"
    for dev in devices:
        if getattr(dev, "ep_name", "") == provider:
            try:
                info = dev.memory_info(kind)
            except Exception as exc:  # any failure means: no pinned memory
                return None, f"{provider}: no host-accessible memory ({type(exc).__name__}: {exc})"
            if info is not None:
                return info, ""
            return None, f"{provider} offers no host-accessible (pinned) memory"
    return None, f"onnxruntime lists no {provider} device for pinned memory"


def _ort_version() -> str:
    try:
        import onnxruntime as ort

        return str(ort.__version__)
    except ImportError:
        return "(not installed)"


class BoundRunner:
    """Runs prepared batches (:func:`~wsi_pipeline.inference.session.prepare_batch`) through
    ``session`` with I/O binding; returns what :func:`~wsi_pipeline.inference.session.run_prepared`
    returns, the same values.

    ``pinned``: copy each batch into a page-locked host buffer bound as the input (when onnxruntime
    can allocate one for ``provider``); otherwise the batch's own array is bound as it is.
    """

    def __init__(self, session: Any, card: ModelCard, provider: str, *, pinned: bool = True) -> None:
        self.session, self.card, self.provider = session, card, provider
        self.outputs = [card.output_name] + ([card.ood_output] if card.ood_output else [])
        self.memory: Any
        self.memory, why = host_memory_info(provider) if pinned else (None, "not asked for")
        self.why_not_pinned = why
        self.why_not_bound = ""  # set when binding failed where session.run did not: plain runs since
        self.proven = False  # a bound run has succeeded
        self.largest = 0  # the largest batch run so far: shorter ones are padded up to it
        self._local = threading.local()

    @property
    def pinned(self) -> bool:
        return self.memory is not None

    def describe(self) -> dict[str, Any]:
        """For the run manifest: how batches reach the device."""
        if self.why_not_bound:
            return {"io_binding": False, "io_binding_why_not": self.why_not_bound}
        out: dict[str, Any] = {"io_binding": True, "pinned_input": self.pinned}
        if not self.pinned:
            out["pinned_input_why_not"] = self.why_not_pinned
        return out

    def _state(self) -> tuple[Any, dict[tuple[tuple[int, ...], str], Any]]:
        st = self._local.__dict__
        if "binding" not in st:
            st["binding"] = self.session.io_binding()
            st["buffers"] = {}
        return st["binding"], st["buffers"]

    def _host_buffer(self, buffers: dict[Any, Any], x: np.ndarray) -> Any:
        """A pinned OrtValue of ``x``'s shape and type (made once per shape), or None when onnxruntime
        cannot give one (then this runner stops trying: pageable from here on, with the reason)."""
        key = (x.shape, x.dtype.str)
        if key not in buffers:
            import onnxruntime as ort

            try:
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(x.shape), x.dtype.type, memory_info=self.memory
                )
            except Exception as exc:  # pinned memory is an optimisation, never an error
                self.memory, self.why_not_pinned = None, f"pinned buffer failed: {type(exc).__name__}: {exc}"
                return None
            if len(buffers) >= MAX_BUFFERS:
                buffers.pop(next(iter(buffers)))
            buffers[key] = value
        return buffers[key]

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.why_not_bound:
            return run_prepared(self.session, self.card, x)
        if self.proven:
            return self._bound_run(x)
        try:
            out = self._bound_run(x)
        except Exception as exc:
            # The binding's first run failed: the same batch through session.run on the same device
            # tells a binding problem (then every batch runs so, recorded) from the model's own error
            # (which session.run raises again).
            result = run_prepared(self.session, self.card, x)
            self.why_not_bound = f"I/O binding failed: {type(exc).__name__}: {str(exc).strip()[:200]}"
            return result
        self.proven = True
        return out

    def _bound_run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        n = len(x)
        if n < self.largest:  # one shape: no per-shape kernel search or TensorRT engine rebuild
            probs, ood = self._bound_run(np.concatenate([x, np.repeat(x[-1:], self.largest - n, axis=0)]))
            return probs[:n], None if ood is None else ood[:n]
        self.largest = n
        binding, buffers = self._state()
        x = np.ascontiguousarray(x)
        value = self._host_buffer(buffers, x) if self.memory is not None else None
        if value is not None:
            try:
                value.update_inplace(x)  # one copy into the pinned buffer; the device reads it at full rate
                binding.bind_ortvalue_input(self.card.input_name, value)
            except Exception as exc:  # pinned memory is an optimisation, never an error: pageable from now
                self.memory, self.why_not_pinned = None, f"pinned input failed: {type(exc).__name__}: {exc}"
                value = None
        if value is None:
            binding.bind_cpu_input(self.card.input_name, x)
        # outputs bound afresh each batch: a bound output keeps its shape, and batches differ in size
        binding.clear_binding_outputs()
        for name in self.outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        res = binding.copy_outputs_to_cpu()
        ood = np.asarray(res[1], np.float32).reshape(-1) if self.card.ood_output else None
        return to_probabilities(res[0], self.card), ood


def make_runner(session: Any, card: ModelCard, provider: str) -> RunFn:
    """How this process runs prepared batches on ``session``: I/O binding for a GPU provider, else
    ``session.run``."""
    if provider != "CPUExecutionProvider":
        return BoundRunner(session, card, provider)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return run_prepared(session, card, x)

    return run


def describe_runner(run: RunFn) -> dict[str, Any]:
    """For the run manifest: ``{"io_binding": False}`` for a plain run, else the binding's details."""
    return run.describe() if isinstance(run, BoundRunner) else {"io_binding": False}
