"""Chunk reductions of per-sample quantities, for any sample-to-chunk weighting ``W`` [N, D].

Sub-batch NIO on the factor engine (``nio_fast.samplewise``) holds per-sample quantities and
needs the chunks': the chunk Gram ``W^T G W`` from a per-sample Gram G [N, N], and chunk
gradients ``W^T V`` from per-sample gradients V [N, K]. With ``W[i, k] = 1 / |chunk k|`` for the
samples of chunk k (``chunk_weights``), W has only N (1 + overlap) nonzeros, so the fused
kernels walk it as sparse rows (:class:`ChunkWeighting`): ``O(nnz^2)`` work for the Gram and
``O(nnz K)`` for the gradients, against ``N^2 D`` and ``N D K`` for dense matmuls, and no
[N, D] operand in memory. Any weighting works, overlapping or not.

Both ops are linear in their data argument, so the backward of each is the same op with W's
rows transposed (``dG = W dC W^T``, ``dV = W dU``): differentiable to any order.

Backends: ``"cpp"`` (the extension's CPU kernels, and CUDA kernels in CUDA builds),
``"triton"`` (``nio_fast.kernels.chunk_reduce``: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"torch"`` (the dense matmuls: the plain twin, always there).
``"auto"`` takes ``availability.default_backend``'s order: Triton on CUDA, else the extension,
else torch; and the dense twin for chunk Grams of fewer than 512 x 512 samples, where the
kernels' fixed costs dominate (``benchmarks/test_chunk_reduce.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Sequence, Union

import torch

from .. import availability

BACKENDS = ("auto", "triton", "cpp", "torch")


def chunk_weights(bounds: Sequence[tuple[int, int]], num_samples: int, dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """``W`` [N, D] with ``W[i, k] = 1 / |chunk k|`` for ``i`` in chunk ``k`` (else 0).

    Chunk ``k`` covers samples ``start <= i < min(end, N)`` (an ``end`` past N is clipped, as
    slicing clips it: ``chunk_bounds`` overshoots with large overlaps); chunks may overlap. Chunk k's mean-loss
    gradient is ``sum_i W[i, k] g_i``, which ``chunk_gram`` turns into their Gram.
    """
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples: expected a non-negative int, got {num_samples!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point dtype, got {dtype}")
    bounds = list(bounds)
    if not bounds:
        raise ValueError("bounds: expected at least one (start, end) chunk, got none")
    weights = torch.zeros((num_samples, len(bounds)), dtype=dtype, device=device)
    for k, bound in enumerate(bounds):
        try:
            start, end = (int(x) for x in bound)
        except (TypeError, ValueError):
            raise ValueError(f"bounds[{k}]: expected a (start, end) pair of ints, got {bound!r}") from None
        end = min(end, num_samples)  # like slicing: chunk_bounds may overshoot N with a large overlap
        if not 0 <= start < end:
            raise ValueError(f"bounds[{k}]: {tuple(bound)} holds no sample of [0, {num_samples})")
        weights[start:end, k] = 1.0 / (end - start)
    return weights


@dataclass(frozen=True)
class SparseRows:
    """Rows of a sparse matrix in CSR form: row r holds ``weights[a]`` at column ``indices[a]``
    for ``offsets[r] <= a < offsets[r + 1]``."""

    offsets: torch.Tensor
    """int64 [R + 1]."""
    indices: torch.Tensor
    """int64 [nnz], each in [0, columns)."""
    weights: torch.Tensor
    """[nnz]."""

    def to(self, dtype: torch.dtype) -> "SparseRows":
        return self if self.weights.dtype == dtype else SparseRows(self.offsets, self.indices, self.weights.to(dtype))


def _csr(dense: torch.Tensor) -> SparseRows:
    """The nonzeros of ``dense`` [R, C] by row (a host round trip: done once per weighting)."""
    host = dense.detach().cpu()
    rows, columns = host.nonzero(as_tuple=True)
    offsets = torch.zeros(host.shape[0] + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(rows, minlength=host.shape[0]).cumsum(0)
    device = dense.device
    return SparseRows(offsets.to(device), columns.to(device), host[rows, columns].to(device))


@dataclass(frozen=True)
class ChunkWeighting:
    """A sample-to-chunk weighting ``W`` [N, D], dense and as sparse rows both ways."""

    dense: torch.Tensor
    """[N, D]: the weights themselves (the torch twin multiplies by it)."""
    by_chunk: SparseRows
    """W^T's rows: chunk k -> its samples and their weights (the forward direction)."""
    by_sample: SparseRows
    """W's rows: sample i -> the chunks it is in (the backward direction)."""

    @classmethod
    def from_dense(cls, weights: torch.Tensor) -> "ChunkWeighting":
        """Any weighting [N, D]; its sparsity is read once (one host synchronisation on a GPU)."""
        if not isinstance(weights, torch.Tensor) or weights.dim() != 2:
            shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights: expected a 2-d [N, D] tensor, got {shape}")
        if not weights.is_floating_point():
            raise TypeError(f"weights: expected a floating-point tensor, got {weights.dtype}")
        return cls(weights, _csr(weights.T), _csr(weights))

    @classmethod
    def from_bounds(cls, bounds: Sequence[tuple[int, int]], num_samples: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> "ChunkWeighting":
        """The mean-of-chunk weighting of ``chunk_weights``, built on the host, moved once."""
        return cls.from_dense(chunk_weights(bounds, num_samples, dtype)).to(device)

    @property
    def num_samples(self) -> int:
        return self.dense.shape[0]

    @property
    def num_chunks(self) -> int:
        return self.dense.shape[1]

    def to(self, device: Optional[torch.device]) -> "ChunkWeighting":
        if device is None or self.dense.device == torch.device(device):
            return self
        move = lambda rows: SparseRows(*(t.to(device) for t in (rows.offsets, rows.indices, rows.weights)))  # noqa: E731
        return ChunkWeighting(self.dense.to(device), move(self.by_chunk), move(self.by_sample))


Weighting = Union[torch.Tensor, ChunkWeighting]


def _load_triton_kernels() -> tuple[Optional[ModuleType], str]:
    return availability.optional_module("nio_fast.kernels.chunk_reduce")


def _backend(backend: str, data: torch.Tensor) -> str:
    """The backend that runs on ``data``; refuses a named one that cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    fused_dtype = data.dtype in (torch.float32, torch.float64)
    if backend == "auto":
        choice = availability.default_backend(data.device)
        if choice == "triton" and _load_triton_kernels()[0] is None:
            choice = "cpp" if availability.cpp_usable(data.device) else "torch"
        return choice if fused_dtype else "torch"
    if backend != "torch" and not fused_dtype:
        raise ValueError(f"backend={backend!r}: the chunk kernels take float32 or float64, got {data.dtype}")
    if backend == "cpp" and not availability.cpp_usable(data.device):
        raise ValueError(f"backend='cpp' cannot run on {data.device}: {availability.backends()['cpp']['reason']}")
    if backend == "triton":
        if not availability.triton_usable(data.device):
            raise ValueError(f"backend='triton' cannot run on {data.device}: "
                             f"{availability.backends()['triton']['reason']}")
        module, reason = _load_triton_kernels()
        if module is None:
            raise ValueError(f"backend='triton': the chunk kernels cannot be imported ({reason})")
    return backend


def _kernel(backend: str, name: str):
    if backend == "triton":
        return getattr(_load_triton_kernels()[0], name)
    return getattr(availability.extension(), name)


class _ChunkReduce(torch.autograd.Function):
    """``kernel(data, rows)``; linear in ``data``, so its backward is the same reduction with the
    transposed rows (and differentiable again through this Function)."""

    @staticmethod
    def forward(ctx, data: torch.Tensor, name: str, rows: SparseRows, transposed: SparseRows,
                backend: str) -> torch.Tensor:
        ctx.name, ctx.rows, ctx.transposed, ctx.backend = name, rows, transposed, backend
        rows = rows.to(data.dtype)
        return _kernel(backend, name)(data.contiguous(), rows.offsets, rows.indices, rows.weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _ChunkReduce.apply(grad, ctx.name, ctx.transposed, ctx.rows, ctx.backend), None, None, None, None


def _check_weights(weights: Weighting, num_samples: int, data: torch.Tensor) -> None:
    dense = weights.dense if isinstance(weights, ChunkWeighting) else weights
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        shape = tuple(dense.shape) if isinstance(dense, torch.Tensor) else type(dense).__name__
        raise ValueError(f"weights: expected a 2-d [N, D] tensor or a ChunkWeighting, got {shape}")
    if not dense.is_floating_point():
        raise TypeError(f"weights: expected a floating-point tensor, got {dense.dtype}")
    if dense.shape[0] != num_samples:
        raise ValueError(f"weights: has {dense.shape[0]} rows (samples) but the data has {num_samples}")
    if dense.device != data.device:
        raise ValueError(f"weights: on {dense.device}, but the data is on {data.device}")


# "auto" below this many Gram entries takes the dense twin: the sparse kernel's fixed costs (two
# launches, the rows copied to the host for checking) outweigh its savings there (benchmarks/
# results/chunk_reduce.md, 2 CPU cores: N = 64 and 256 at 0.5-1x the dense matmuls, N = 1024 at
# 1.4-5x faster).
_GRAM_DENSE_BELOW = 512 * 512


def _reduce(data: torch.Tensor, weights: Weighting, backend: str, kernel: str, reference) -> torch.Tensor:
    _check_weights(weights, data.shape[0], data)
    chosen = _backend(backend, data)
    if backend == "auto" and kernel == "chunk_sandwich" and data.numel() < _GRAM_DENSE_BELOW:
        chosen = "torch"
    if chosen == "torch" or (isinstance(weights, torch.Tensor) and weights.requires_grad):
        return reference(data, weights.dense if isinstance(weights, ChunkWeighting) else weights)
    if not isinstance(weights, ChunkWeighting):
        weights = ChunkWeighting.from_dense(weights)
    return _ChunkReduce.apply(data, kernel, weights.by_chunk, weights.by_sample, chosen)


def chunk_gram_reference(sample_gram: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain twin of ``chunk_gram``: ``W^T G W`` by two matmuls (differentiable in both)."""
    return weights.T.to(sample_gram.dtype) @ sample_gram @ weights.to(sample_gram.dtype)


def chunk_gram(sample_gram: torch.Tensor, weights: Weighting, backend: str = "auto") -> torch.Tensor:
    """``W^T G W``: the [D, D] Gram of chunk gradients from the [N, N] per-sample Gram.

    When each chunk's loss is the mean of per-sample losses over its members and no layer
    couples samples (no BatchNorm batch statistics), chunk k's gradient is
    ``sum_i W[i, k] g_i``, so its Gram with chunk l is ``sum_{i,j} W[i,k] G[i,j] W[j,l]``.

    Args:
        sample_gram: [N, N] floating tensor (fused backends: float32 / float64).
        weights: ``W`` [N, D] (``chunk_weights``, or any weighting), or a
            :class:`ChunkWeighting` built once for many calls.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"`` (module docstring).

    Differentiable in ``sample_gram`` to any order; a ``weights`` tensor that requires grad
    takes the torch twin, which differentiates in it too.
    """
    if not isinstance(sample_gram, torch.Tensor) or sample_gram.dim() != 2 or sample_gram.shape[0] != sample_gram.shape[1]:
        shape = tuple(sample_gram.shape) if isinstance(sample_gram, torch.Tensor) else type(sample_gram).__name__
        raise ValueError(f"sample_gram: expected a square [N, N] tensor, got {shape}")
    if not sample_gram.is_floating_point():
        raise TypeError(f"sample_gram: expected a floating-point tensor, got {sample_gram.dtype}")
    return _reduce(sample_gram, weights, backend, "chunk_sandwich", chunk_gram_reference)


def chunk_sums_reference(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain twin of ``chunk_sums``: ``W^T V``."""
    return weights.T.to(values.dtype) @ values


def chunk_sums(values: torch.Tensor, weights: Weighting, backend: str = "auto") -> torch.Tensor:
    """``W^T V``: [D, K] chunk gradients from [N, K] per-sample gradients (rows of V).

    Same arguments and differentiability as ``chunk_gram``.
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values: expected a 2-d [N, K] tensor, got {shape}")
    if not values.is_floating_point():
        raise TypeError(f"values: expected a floating-point tensor, got {values.dtype}")
    return _reduce(values, weights, backend, "chunk_row_sums", chunk_sums_reference)
