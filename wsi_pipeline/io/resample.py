"""Integer-factor box downsampling: the one implementation behind tile resizing, thumbnails, in-memory
pyramids and the test slides' lower levels."""

from __future__ import annotations

import numpy as np


def box_mean(image: np.ndarray, factor: int, *, pad: int | None = None) -> np.ndarray:
    """Downsample uint8 pixels of shape ``(..., H, W, C)`` by an integer ``factor`` with a box filter.

    ``image``: one image (H, W, C) or a batch (N, H, W, C), or any leading axes; H and W in input
    pixels. Each output pixel is the mean of a ``factor`` x ``factor`` block of input pixels, per
    channel, rounded half up in exact integer arithmetic: ``(sum + k*k // 2) // (k*k)`` with
    ``k = factor`` (no floating point, so the result does not depend on the CPU).

    Output: ``floor(H / factor)`` x ``floor(W / factor)`` pixels; a partial block at the right or
    bottom edge is dropped. With ``pad`` (a uint8 value, e.g. 255 for white glass) the edges are
    instead padded with ``pad`` up to whole blocks, giving ``ceil(H / factor)`` x ``ceil(W / factor)``
    pixels whose edge blocks average real and padded pixels. ``factor == 1`` returns ``image`` itself.

    Sums are separable strided adds (k row phases, then k column phases) into uint16 for
    ``factor <= 16`` (16 * 16 * 255 + 128 fits) and a wider accumulator beyond.
    """
    if image.dtype != np.uint8 or image.ndim < 3:
        raise ValueError(
            f"box_mean needs uint8 pixels of shape (..., H, W, C), got {image.dtype} {image.shape}"
        )
    k = int(factor)
    if k != factor or k < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if k == 1:
        return image
    h, w = image.shape[-3], image.shape[-2]
    if pad is not None and (h % k or w % k):
        hp, wp = -(-h // k) * k, -(-w // k) * k
        padded = np.full((*image.shape[:-3], hp, wp, image.shape[-1]), pad, np.uint8)
        padded[..., :h, :w, :] = image
        image, h, w = padded, hp, wp
    oh, ow = h // k, w // k
    x = image[..., : oh * k, : ow * k, :]
    n = k * k
    top = n * 255 + n // 2  # the largest value the accumulator holds
    acc_type = next(np.dtype(t) for t in (np.uint16, np.uint32, np.uint64) if top <= np.iinfo(t).max)
    rows: np.ndarray = x[..., 0::k, :, :].astype(acc_type)  # (..., oh, ow*k, C): k rows summed first,
    for dy in range(1, k):  # whole contiguous rows per add
        rows += x[..., dy::k, :, :]
    # ... then k columns of those, accumulated channel-planar (..., oh, C, ow) so each add runs along
    # a row instead of over 3 channels at a time: 3-10x faster than columns first on (H, W, 3).
    acc = np.ascontiguousarray(rows[..., 0::k, :].swapaxes(-1, -2))
    for dx in range(1, k):
        acc += rows[..., dx::k, :].swapaxes(-1, -2)
    acc += n // 2
    acc //= n
    return np.ascontiguousarray(acc.astype(np.uint8).swapaxes(-1, -2))


__all__ = ["box_mean"]
