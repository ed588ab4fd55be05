"""The Triton chunk reductions (nio_fast.kernels.chunk_reduce) against a dense plain-PyTorch twin.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), one numpy program at a time: the sizes are tiny and odd on purpose (masks), and the
cases few. The row layouts cover overlapping rows, an empty row, a column repeated inside one row
and the uniform contiguous chunks the samplewise engine uses.
"""
from __future__ import annotations

import os
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from nio_fast.kernels import chunk_reduce  # noqa: E402
from hopper_compile import run_script  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
RUNNABLE = INTERPRETING or CUDA
DEVICE = "cpu" if INTERPRETING else "cuda"
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="needs a CUDA GPU or TRITON_INTERPRET=1")

# Relative to the same sums taken over absolute values (what rounding errors scale with).
RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["fp32", "fp64"]

# Rows of W as lists of column indices. "small" (N = 7): rows 0 and 2 share column 2, row 1 is
# empty, row 2 holds column 2 twice. "odd" (N = 33): five rows, overlapping, with repeats inside
# rows 0 and 4, an empty row and a row of one entry; row 4 has 41 entries.
SMALL = (7, [[0, 2, 5], [], [2, 6, 2, 1]])
ODD = (33, [[3, 17, 3, 30, 8, 12, 0, 32, 21, 17, 5], [], [17, 8, 9], [32], list(range(1, 33)) + list(range(0, 33, 4))])


def contiguous_chunks(n: int, bounds: list[int]):
    """Row k = range(bounds[k], bounds[k + 1]) with weight 1 / its length (chunk means)."""
    rows = [list(range(start, end)) for start, end in zip(bounds[:-1], bounds[1:])]
    weights = [[1.0 / (end - start)] * (end - start) for start, end in zip(bounds[:-1], bounds[1:])]
    return n, rows, weights


def csr(rows: list[list[int]], weights: list[list[float]] | None, dtype: torch.dtype, seed: int):
    """offsets, indices, weights (fresh random nonzero weights when none are given) on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    indices = torch.tensor([i for row in rows for i in row], dtype=torch.int64)
    if weights is None:
        w = torch.randn(indices.numel(), generator=gen, dtype=torch.float64) + 0.1
    else:
        w = torch.tensor([x for row in weights for x in row], dtype=torch.float64)
    return offsets.to(DEVICE), indices.to(DEVICE), w.to(dtype).to(DEVICE)


def dense_w(offsets: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """W [R, N] in fp64 on the CPU, repeated columns accumulated."""
    offsets, indices, weights = offsets.cpu(), indices.cpu(), weights.cpu().double()
    num_rows = offsets.numel() - 1
    row_of_entry = torch.repeat_interleave(torch.arange(num_rows), offsets.diff())
    w = torch.zeros(num_rows, n, dtype=torch.float64)
    w.index_put_((row_of_entry, indices), weights, accumulate=True)
    return w


def sandwich_twin(matrix, offsets, indices, weights):
    """(W M W^T, |W| |M| |W|^T) in fp64, from the inputs as the kernel sees them."""
    w = dense_w(offsets, indices, weights, matrix.shape[0])
    m = matrix.cpu().double()
    return w @ m @ w.T, w.abs() @ m.abs() @ w.abs().T


def row_sums_twin(values, offsets, indices, weights):
    """(W V, |W| |V|) in fp64."""
    w = dense_w(offsets, indices, weights, values.shape[0])
    v = values.cpu().double()
    return w @ v, w.abs() @ v.abs()


def assert_matches(ours: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, name: str):
    assert ours.shape == expected.shape and ours.dtype == dtype and ours.device.type == DEVICE
    error = (ours.cpu().double() - expected).abs()
    scaled = (error / bound.clamp_min(1e-300)).max()
    assert torch.all(error <= RTOL[dtype] * bound), f"{name}: max scaled error {scaled:.3e}"


def check_both(n: int, rows, weights, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    matrix = torch.randn(n, n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    values = torch.randn(n, k, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    offsets, indices, w = csr(rows, weights, dtype, seed)

    sandwich = chunk_reduce.chunk_sandwich(matrix, offsets, indices, w)
    assert_matches(sandwich, *sandwich_twin(matrix, offsets, indices, w), dtype, "chunk_sandwich")
    sums = chunk_reduce.chunk_row_sums(values, offsets, indices, w)
    assert_matches(sums, *row_sums_twin(values, offsets, indices, w), dtype, "chunk_row_sums")
    # Empty rows come out as exact zeros (every element is written).
    for r, row in enumerate(rows):
        if not row:
            assert torch.all(sandwich[r] == 0) and torch.all(sandwich[:, r] == 0) and torch.all(sums[r] == 0)
    return sandwich, sums


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case, k", [(SMALL, 5), (ODD, 70)], ids=["N7R3K5", "N33R5K70"])
def test_sparse_rows_match_the_dense_twin(case, k, dtype):
    n, rows = case
    check_both(n, rows, None, k, dtype, seed=n + k)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_contiguous_chunks(dtype):
    """Uneven chunks of a batch of 33 (one of a single sample), weights 1 / chunk size."""
    bounds = [0, 5, 17, 18, 33]
    n, rows, weights = contiguous_chunks(33, bounds)
    check_both(n, rows, weights, 9, dtype, seed=3)
    # Independently of the twin: entry (r, s) is the mean of M's block (chunk r, chunk s).
    gen = torch.Generator().manual_seed(4)
    matrix = torch.randn(n, n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    ours = chunk_reduce.chunk_sandwich(matrix, *csr(rows, weights, dtype, seed=3)).cpu().double()
    chunks = list(zip(bounds[:-1], bounds[1:]))
    m = matrix.cpu().double()
    block_means = torch.tensor([[m[r0:r1, s0:s1].mean().item() for s0, s1 in chunks] for r0, r1 in chunks],
                               dtype=torch.float64)
    torch.testing.assert_close(ours, block_means, rtol=RTOL[dtype], atol=RTOL[dtype])


@needs_triton
def test_strided_inputs_and_determinism():
    """M and V read through their strides (transposed views, no copy); two calls agree bitwise."""
    n, rows = ODD
    gen = torch.Generator().manual_seed(7)
    matrix = torch.randn(n, n, generator=gen, dtype=torch.float64).to(DEVICE).T
    values = torch.randn(13, n, generator=gen, dtype=torch.float64).to(DEVICE).T  # [N, 13]
    assert not matrix.is_contiguous() and not values.is_contiguous()
    offsets, indices, w = csr(rows, None, torch.float64, seed=7)
    sandwich = chunk_reduce.chunk_sandwich(matrix, offsets, indices, w)
    assert_matches(sandwich, *sandwich_twin(matrix, offsets, indices, w), torch.float64, "chunk_sandwich")
    sums = chunk_reduce.chunk_row_sums(values, offsets, indices, w)
    assert_matches(sums, *row_sums_twin(values, offsets, indices, w), torch.float64, "chunk_row_sums")
    assert torch.equal(chunk_reduce.chunk_sandwich(matrix, offsets, indices, w), sandwich)
    assert torch.equal(chunk_reduce.chunk_row_sums(values, offsets, indices, w), sums)


@needs_triton
def test_empty_shapes():
    matrix, values = torch.randn(4, 4, device=DEVICE), torch.randn(4, 6, device=DEVICE)
    no_rows = (torch.zeros(1, dtype=torch.int64, device=DEVICE), torch.zeros(0, dtype=torch.int64, device=DEVICE),
               torch.zeros(0, device=DEVICE))
    assert chunk_reduce.chunk_sandwich(matrix, *no_rows).shape == (0, 0)
    assert chunk_reduce.chunk_row_sums(values, *no_rows).shape == (0, 6)
    all_empty = (torch.zeros(3, dtype=torch.int64, device=DEVICE),) + no_rows[1:]
    assert torch.equal(chunk_reduce.chunk_sandwich(matrix, *all_empty), torch.zeros(2, 2, device=DEVICE))
    assert torch.equal(chunk_reduce.chunk_row_sums(values, *all_empty), torch.zeros(2, 6, device=DEVICE))
    offsets, indices, w = csr([[1, 3], [0]], None, torch.float32, seed=0)
    assert chunk_reduce.chunk_row_sums(values[:, :0], offsets, indices, w).shape == (2, 0)


@needs_triton
def test_rejected_inputs():
    offsets, indices, w = csr([[1, 3], [0]], None, torch.float32, seed=0)
    matrix = torch.randn(4, 4, device=DEVICE)
    with pytest.raises(TypeError, match="weights have dtype"):
        chunk_reduce.chunk_sandwich(matrix, offsets, indices, w.double())
    with pytest.raises(TypeError, match="chunk_row_sums"):
        chunk_reduce.chunk_row_sums(matrix.half(), offsets, indices, w.half())
    with pytest.raises(ValueError, match="square"):
        chunk_reduce.chunk_sandwich(matrix[:3], offsets, indices, w)
    with pytest.raises(ValueError, match="offsets"):
        chunk_reduce.chunk_row_sums(matrix, offsets.int(), indices, w)
    with pytest.raises(ValueError, match="weights must be 1-d"):
        chunk_reduce.chunk_row_sums(matrix, offsets, indices, w[:2])


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.compiler import ASTSource
    from hopper_compile import NO_NVIDIA_BACKEND, compile_and_report
    if "nvidia" not in triton.backends.backends:
        sys.exit(NO_NVIDIA_BACKEND)
    from nio_fast.kernels import chunk_reduce as cr

    for pointer in ("*fp32", "*fp64"):
        row_sums = ASTSource(
            fn=cr._chunk_row_sums_kernel,
            signature={"values_ptr": pointer, "offsets_ptr": "*i64", "indices_ptr": "*i64", "weights_ptr": pointer,
                       "out_ptr": pointer, "K": "i32", "stride_vn": "i32", "stride_vk": "i32",
                       "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_K": cr._ROW_SUMS_BLOCK_K},
        )
        compile_and_report(f"{pointer} row_sums", row_sums, cr._NUM_WARPS)
    """
)


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled by the tests above")
def test_kernels_compile_for_hopper():
    """Without a GPU, still compile the kernel for sm_90 (the interpreter checks none of the GPU rules)."""
    print(run_script(_COMPILE_SCRIPT))  # registers and stack (spills) per kernel, shown with -s
