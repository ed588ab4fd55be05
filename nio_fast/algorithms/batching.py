"""Batches: unpacking, slicing into chunks, joining, calling the model, cycling the data.

A batch is ``(inputs, targets)``. ``inputs`` is a tensor (``model(x)``), a tuple or list of
tensors (``model(*x)``) or a dict (``model(**x)``). Samples run along dimension 0 of every
tensor; non-tensor entries (flags, ints) are passed through unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.func import functional_call

Batch = tuple[Any, Any]


def unpack_batch(batch: Any, arg: str = "batch") -> Batch:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{arg}: expected an (inputs, targets) pair, got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    return batch[0], batch[1]


def is_single_batch(data: Any) -> bool:
    """``data`` is one batch (not an iterable of batches): a pair whose targets are a tensor."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def num_samples(inputs: Any, arg: str = "batch") -> int:
    """The batch size: dimension 0 of the first tensor in ``inputs``."""
    tensor = first_tensor(inputs)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(f"{arg}: the inputs hold no tensor with a batch dimension")
    return tensor.shape[0]


def slice_rows(obj: Any, start: int, end: int) -> Any:
    """Rows ``start:end`` of every tensor in ``obj`` (tensor, tuple, list or dict)."""
    if isinstance(obj, torch.Tensor):
        return obj[start:end] if obj.dim() > 0 else obj
    if isinstance(obj, Mapping):
        return {key: slice_rows(value, start, end) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_rows(value, start, end) for value in obj)
    return obj


def concat_rows(parts: list[Any]) -> Any:
    """Join batches (or inputs, or targets) of the same structure along dimension 0."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, Mapping):
        return {key: concat_rows([part[key] for part in parts]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(concat_rows(list(column)) for column in zip(*parts))
    return first


def call_model(model: torch.nn.Module, inputs: Any, parameters: Mapping[str, torch.Tensor] | None = None) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)``; with ``parameters``, those replace the
    model's own tensors of the same names for this call (``torch.func.functional_call``)."""
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if parameters is None:
        return model(*args, **kwargs)
    return functional_call(model, dict(parameters), args, kwargs)


def chunk_bounds(num: int, num_chunks: int, overlap: float) -> list[tuple[int, int]]:
    """The D chunks of NIO.md step 3, as (start, end) pairs.

    L = floor(N / D); chunk 0 starts at 0, chunk k >= 1 at floor((1 - r) L k); chunk k < D-1
    ends at floor((1 + r) L (k + 1)), the last at N.
    """
    length = num // num_chunks
    bounds = []
    for k in range(num_chunks):
        start = 0 if k == 0 else math.floor((1 - overlap) * length * k)
        end = num if k == num_chunks - 1 else math.floor((1 + overlap) * length * (k + 1))
        bounds.append((start, end))
    return bounds


def equal_chunks(bounds: list[tuple[int, int]]) -> bool:
    """The chunks tile the batch in equal parts (overlap 0 and D divides N)."""
    length = bounds[0][1] - bounds[0][0]
    return all(start == k * length and end == (k + 1) * length for k, (start, end) in enumerate(bounds))


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in ``obj`` to ``device`` (no copy when already there)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


class BatchStream:
    """Endless batches from ``data``: an iterable of batches (cycled), or one batch (repeated)."""

    def __init__(self, data: Any, device: torch.device, arg: str = "data"):
        self._arg = arg
        self._device = device
        if is_single_batch(data):
            self._single: Batch | None = unpack_batch(data, arg)
            self._iterable = None
        else:
            if not isinstance(data, Iterable):
                raise TypeError(f"{arg}: expected an iterable of (inputs, targets) batches or one batch, "
                                f"got {type(data).__name__}")
            self._single, self._iterable = None, data
        self._iterator: Iterator | None = None
        self._pending: Batch | None = None

    def peek(self) -> Batch:
        """The next batch, left in the stream (the next ``next`` returns it again)."""
        if self._pending is None:
            self._pending = next(self)
        return self._pending

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> Batch:
        if self._pending is not None:
            batch, self._pending = self._pending, None
            return batch
        if self._single is not None:
            return to_device(self._single, self._device)
        for fresh in (False, True):
            if self._iterator is None or fresh:
                self._iterator = iter(self._iterable)
            try:
                return to_device(unpack_batch(next(self._iterator), f"{self._arg} (a batch it yielded)"),
                                 self._device)
            except StopIteration:
                continue
        raise ValueError(f"{self._arg}: yielded no batches")
