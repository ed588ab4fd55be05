"""Tests of the Triton Gram kernels (nio_fast.kernels) against a plain fp64 torch reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set below before
triton is imported), which executes every program in numpy: sizes here are kept small on purpose.
"""

from __future__ import annotations

import os
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

from nio_fast.kernels import gram_backward, gram_forward  # noqa: E402
from hopper_compile import run_script  # noqa: E402
from nio_fast.kernels.gram import TABLE_BLOCK  # noqa: E402
from nio_fast.kernels.work_table import (  # noqa: E402
    build_work_table,
    is_storage_walkable,
    prepare_gram_groups,
)

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()

# Relative tolerances of the Gram (scaled by sqrt(G_ii G_jj), the Cauchy-Schwarz bound of G_ij)
# and of the backward (scaled by |S| @ |X|, the bound of each output element).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- helpers


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh standard-normal values (drawn in fp32 on the CPU for reproducibility across devices)."""
    return torch.randn(shape, generator=generator).to(dtype=dtype, device=device)


def random_grads(shapes, num_gradients, generator, dtypes=torch.float32, device="cpu"):
    """grads[d][p] with shapes[p] and dtypes[p] (a single dtype applies to all)."""
    if isinstance(dtypes, torch.dtype):
        dtypes = [dtypes] * len(shapes)
    return [
        [randn(shape, generator, dtype, device) for shape, dtype in zip(shapes, dtypes)]
        for _ in range(num_gradients)
    ]


def flat_fp64(grads) -> torch.Tensor:
    """[D, m] fp64 matrix of the concatenated, flattened gradients (the plain reference layout)."""
    rows = []
    for gradient in grads:
        parts = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float64) for t in gradient]
        rows.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))
    return torch.stack(rows)


def split_like(flat: torch.Tensor, like):
    """Undo flat_fp64 for one gradient: a [m] vector back into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        out.append(flat[start : start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def assert_gram_close(gram, grads, rtol):
    x = flat_fp64(grads)
    reference = x @ x.T
    diagonal = reference.diagonal()
    scale = torch.sqrt(diagonal[:, None] * diagonal[None, :])
    error = (gram.detach().cpu().double() - reference).abs()
    assert torch.all(error <= rtol * scale + 1e-300), f"max scaled error {(error / scale).max():.3e} > {rtol}"


def assert_backward_close(outputs, grads, S, rtol):
    """Values within rtol * (|S| @ |X|), plus half an ulp of the output dtype; layout of empty_like."""
    x = flat_fp64(grads)
    S64 = S.detach().cpu().double()
    reference = S64 @ x
    bound = S64.abs() @ x.abs()
    assert len(outputs) == len(grads)
    for d, (out_gradient, in_gradient) in enumerate(zip(outputs, grads)):
        assert len(out_gradient) == len(in_gradient)
        for out, inp, ref, scale in zip(
            out_gradient, in_gradient, split_like(reference[d], in_gradient), split_like(bound[d], in_gradient)
        ):
            assert out.shape == inp.shape and out.dtype == inp.dtype and out.device == inp.device
            assert out.stride() == torch.empty_like(inp).stride()
            rounding = torch.finfo(out.dtype).eps if out.dtype in (torch.float16, torch.bfloat16) else 0.0
            error = (out.cpu().double() - ref).abs()
            assert torch.all(error <= rtol * scale + rounding * ref.abs() + 1e-300), (
                f"grad {d}: max error {error.max():.3e}"
            )


def check_forward_and_backward(grads, generator, rtol):
    num_gradients = len(grads)
    device = grads[0][0].device if grads and grads[0] else torch.device("cpu")
    gram = gram_forward(grads)
    assert gram.shape == (num_gradients, num_gradients)
    assert gram.device == device
    assert_gram_close(gram, grads, rtol)
    S = randn((num_gradients, num_gradients), generator, device=device)
    S = S + S.T  # what the autograd layer passes (dG + dG^T)
    assert_backward_close(gram_backward(grads, S), grads, S, rtol)
    return gram


# ----------------------------------------------------------------------------- work table (host only)


def test_work_table_format():
    generator = seeded(0)
    block = 8
    shapes = [(0,), (1,), (7,), (8,), (3, 3), (0, 5)]
    grads = random_grads(shapes, 3, generator)
    for gradient in grads:
        gradient.append(randn((5, 4), generator).t())  # dense but permuted: walkable in place
    shapes.append((4, 5))
    addresses, rows = build_work_table(grads, block)

    assert addresses.dtype == torch.int64 and rows.dtype == torch.int64
    assert addresses.shape == (len(shapes), 3) and rows.shape[1] == 3
    expected_addresses = [[grads[d][p].data_ptr() for d in range(3)] for p in range(len(shapes))]
    assert addresses.tolist() == expected_addresses

    covered = [torch.zeros(max(1, grads[0][p].numel()), dtype=torch.int64) for p in range(len(shapes))]
    previous = (-1, -1)
    for tensor_index, offset, count in rows.tolist():
        assert (tensor_index, offset) > previous, "rows must go tensor by tensor, in element order"
        previous = (tensor_index, offset)
        assert 0 < count <= block and offset % block == 0
        assert offset + count <= grads[0][tensor_index].numel()
        covered[tensor_index][offset : offset + count] += 1
    for p, coverage in enumerate(covered):
        numel = grads[0][p].numel()
        assert torch.all(coverage[:numel] == 1), f"tensor {p}: every element exactly once"
        rows_of_p = [row for row in rows.tolist() if row[0] == p]
        assert len(rows_of_p) == -(-numel // block)


def test_work_table_empty_group():
    addresses, rows = build_work_table([[], []], 16)
    assert addresses.shape == (0, 2) and rows.shape == (0, 3)


def test_storage_walkability():
    generator = seeded(1)
    base = randn((6, 10), generator)
    assert is_storage_walkable(base)
    assert is_storage_walkable(base.t())
    assert is_storage_walkable(randn((3, 4, 5), generator).permute(2, 0, 1))
    assert is_storage_walkable(base[2:4])  # offset, but dense
    assert not is_storage_walkable(base[:, ::3])
    assert not is_storage_walkable(base[:, :4])
    assert not is_storage_walkable(randn((6, 1), generator).expand(6, 5))
    assert is_storage_walkable(torch.empty_strided((5, 1, 3), (3, 99, 1)))


def test_prepare_groups_by_dtype_and_copies_only_when_needed():
    generator = seeded(2)
    transposed = [randn((7, 5), generator).t() for _ in range(2)]
    gapped = [randn((6, 10), generator)[:, ::3] for _ in range(2)]
    mixed_layout = [randn((4, 9), generator), randn((9, 4), generator).t()]
    halves = [randn((3,), generator, torch.float16) for _ in range(2)]
    empty = [torch.zeros(0, 3) for _ in range(2)]
    grads = [[transposed[d], halves[d], gapped[d], empty[d], mixed_layout[d]] for d in range(2)]
    inputs = prepare_gram_groups(grads)

    assert [group.dtype for group in inputs.groups] == [torch.float32, torch.float16]
    fp32_group, fp16_group = inputs.groups
    assert fp32_group.param_indices == [0, 2, 4] and fp16_group.param_indices == [1]
    for d in range(2):
        assert fp32_group.walk_inputs[d][0] is transposed[d], "dense permuted: used in place"
        assert fp32_group.walk_inputs[d][1].is_contiguous(), "gaps: copied"
        assert fp32_group.walk_inputs[d][2].is_contiguous(), "layouts differ across d: copied"
        assert fp16_group.walk_inputs[d][0] is halves[d]
    assert inputs.result_dtype == torch.float32


# ----------------------------------------------------------------------------- kernels


class GramKernelChecks:
    """Checks shared by the interpreter (CPU tensors) and CUDA test classes."""

    device = "cpu"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("num_gradients", [2, 3, 4, 8, 16, 64])
    def test_matches_reference(self, num_gradients, dtype):
        generator = seeded(10 + num_gradients)
        # Odd sizes, 1- and 0-element tensors; small D also gets tensors spanning several work
        # rows (TABLE_BLOCK elements each) with a partial last tile. D = 64 stays tiny: the
        # interpreter is slow.
        shapes = [(37, 29), (1,), (0, 4), (5,), (3, 1, 7)]
        if num_gradients <= 4:
            shapes.append((2 * TABLE_BLOCK + 77,))
        elif num_gradients == 64:
            shapes = [(13, 11), (1,), (0,), (67,)]
        grads = random_grads(shapes, num_gradients, generator, dtype, self.device)
        gram = check_forward_and_backward(grads, generator, RTOL[dtype])
        assert gram.dtype == dtype

    def test_work_table_lives_on_the_gradients_device(self):
        generator = seeded(31)
        grads = random_grads([(5,), (0,), (20,)], 2, generator, device=self.device)
        addresses, rows = build_work_table(grads, 8)
        assert addresses.device == grads[0][0].device and rows.device == grads[0][0].device
        assert addresses.cpu().tolist() == [[grads[d][p].data_ptr() for d in range(2)] for p in range(3)]
        assert rows.cpu().tolist() == [[0, 0, 5], [2, 0, 8], [2, 8, 8], [2, 16, 4]]

    def test_single_parameter(self):
        generator = seeded(20)
        check_forward_and_backward(random_grads([(300,)], 4, generator, device=self.device), generator, 1e-5)

    def test_single_element_parameters(self):
        generator = seeded(21)
        grads = random_grads([(1,), (1, 1), (1,)], 3, generator, torch.float64, self.device)
        check_forward_and_backward(grads, generator, 1e-10)

    def test_many_tiny_parameters(self):
        generator = seeded(22)
        sizes = torch.randint(0, 6, (500,), generator=generator).tolist()
        grads = random_grads([(size,) for size in sizes], 3, generator, device=self.device)
        check_forward_and_backward(grads, generator, 1e-5)

    def test_non_contiguous_inputs(self):
        generator = seeded(23)
        num_gradients = 4
        grads = [
            [
                randn((7, 5), generator, device=self.device).t(),  # dense, permuted: walked in place
                randn((3, 4, 5), generator, device=self.device).permute(2, 0, 1),
                randn((6, 10), generator, device=self.device)[:, ::3],  # gaps: copied
                randn((6, 1), generator, device=self.device).expand(6, 5),  # broadcast: copied
                randn((4, 9), generator, device=self.device) if d % 2 else randn((9, 4), generator).t().to(self.device),
                randn((101,), generator, device=self.device)[1:],  # storage offset: misaligned base
            ]
            for d in range(num_gradients)
        ]
        check_forward_and_backward(grads, generator, 1e-5)
        # Dense inputs keep their own strides in the backward, also when layouts differ across d.
        outputs = gram_backward(grads, torch.eye(num_gradients, device=self.device))
        for d in range(num_gradients):
            for p in (0, 1, 4):
                assert outputs[d][p].stride() == grads[d][p].stride()
                torch.testing.assert_close(outputs[d][p], grads[d][p], rtol=0, atol=0)

    def test_addresses_on_both_sides_of_the_anchor(self):
        # Kernels address everything relative to the group's first tensor: put it in the middle.
        generator = seeded(29)
        storage = randn((600,), generator, device=self.device)
        views = [storage[start : start + 100] for start in (300, 0, 500, 100, 200, 400)]
        grads = [views[0:2], views[2:4], views[4:6]]
        check_forward_and_backward(grads, generator, 1e-5)

    def test_single_gradient(self):
        generator = seeded(30)
        check_forward_and_backward(random_grads([(9, 4), (1,)], 1, generator, device=self.device), generator, 1e-5)

    def test_mixed_dtypes_in_one_call(self):
        generator = seeded(24)
        shapes = [(33,), (40,), (7, 3), (11,), (0,)]
        dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float16]
        grads = random_grads(shapes, 3, generator, dtypes, self.device)
        gram = check_forward_and_backward(grads, generator, 1e-5)
        assert gram.dtype == torch.float64, "any fp64 input makes the result fp64"
        without_fp64 = [[t for t in gradient if t.dtype != torch.float64] for gradient in grads]
        gram = check_forward_and_backward(without_fp64, generator, 1e-5)
        assert gram.dtype == torch.float32

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_low_precision_within_twice_torch_error(self, dtype):
        generator = seeded(25)
        num_gradients = 5
        grads = random_grads([(45, 37), (1000,), (3,)], num_gradients, generator, dtype, self.device)
        x = flat_fp64(grads)
        low = x.to(dtype)  # exact: the inputs already are `dtype` values
        S = randn((num_gradients, num_gradients), generator)
        S = S + S.T

        reference = x @ x.T
        torch_error = (torch.matmul(low, low.T).double() - reference).abs().max()
        our_error = (gram_forward(grads).cpu().double() - reference).abs().max()
        assert our_error <= 2 * torch_error, (our_error, torch_error)

        reference = S.double() @ x
        torch_error = (torch.matmul(S.to(dtype), low).double() - reference).abs().max()
        outputs = gram_backward(grads, S.to(self.device))
        our_error = (flat_fp64(outputs) - reference).abs().max()
        assert our_error <= 2 * torch_error, (our_error, torch_error)

    def test_no_parameters_and_only_empty_parameters(self):
        generator = seeded(26)
        gram = gram_forward([[], [], []])
        assert gram.shape == (3, 3) and gram.dtype == torch.float32 and not gram.any()
        assert gram_backward([[], [], []], torch.ones(3, 3)) == [[], [], []]
        grads = [[torch.zeros(0, 2, device=self.device), torch.zeros(0, dtype=torch.float64, device=self.device)]] * 2
        gram = gram_forward(grads)
        assert gram.dtype == torch.float64 and not gram.any()
        outputs = gram_backward(grads, randn((2, 2), generator, device=self.device))
        assert [[t.shape for t in gradient] for gradient in outputs] == [[(0, 2), (0,)]] * 2

    def test_deterministic(self):
        generator = seeded(27)
        grads = random_grads([(TABLE_BLOCK + 5,), (300,)], 3, generator, device=self.device)
        assert torch.equal(gram_forward(grads), gram_forward(grads))

    def test_rejects_bad_inputs(self):
        generator = seeded(28)
        grads = random_grads([(4,)], 2, generator, device=self.device)
        with pytest.raises(ValueError):
            gram_forward([grads[0], [randn((5,), generator, device=self.device)]])
        with pytest.raises(ValueError):
            gram_forward([grads[0], []])
        with pytest.raises(TypeError):
            gram_forward([[torch.ones(3, dtype=torch.int32, device=self.device)]] * 2)
        with pytest.raises(ValueError):
            gram_backward(grads, torch.ones(3, 3))


@pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
class TestGramInterpreter(GramKernelChecks):
    device = "cpu"


@pytest.mark.skipif(not CUDA or INTERPRETING, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
class TestGramCUDA(GramKernelChecks):
    device = "cuda"


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from hopper_compile import NO_NVIDIA_BACKEND
    if "nvidia" not in triton.backends.backends:
        sys.exit(NO_NVIDIA_BACKEND)
    from nio_fast.kernels import gram

    POINTER = {tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float32: "*fp32", tl.float64: "*fp64"}
    TORCH = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32,
             tl.float64: torch.float64}
    # One config per lowering path (kept few: each compile takes seconds): 16-bit tensor-core
    # forward at the register-heaviest DPAD, the fp32 CUDA-core dot, the fp64 DMMA dot.
    configs = [(tl.bfloat16, 64), (tl.float32, 64), (tl.float64, 16)]
    for element, dpad in configs:
        acc = tl.float64 if element == tl.float64 else tl.float32
        common = {"num_rows": "i64", "D": "i32", "DPAD": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}
        forward = ASTSource(
            fn=gram._gram_forward_kernel,
            signature={"addresses_ptr": "*i64", "rows_ptr": "*i64", "partials_ptr": POINTER[acc],
                       "anchor_ptr": POINTER[element], "anchor_address": "i64", **common,
                       "DOT_DTYPE": "constexpr", "ACC_DTYPE": "constexpr"},
            constexprs={"DOT_DTYPE": element, "ACC_DTYPE": acc, "DPAD": dpad, "ALIGNED": True,
                        "BLOCK": gram._block_size(gram._FORWARD_TILE_ELEMENTS, dpad, TORCH[element])},
        )
        backward = ASTSource(
            fn=gram._gram_backward_kernel,
            signature={"input_addresses_ptr": "*i64", "output_addresses_ptr": "*i64", "rows_ptr": "*i64",
                       "s_ptr": POINTER[acc], "anchor_ptr": POINTER[element], "anchor_address": "i64", **common,
                       "MATH_DTYPE": "constexpr"},
            constexprs={"MATH_DTYPE": acc, "DPAD": dpad, "ALIGNED": dpad == 64,
                        "BLOCK": gram._block_size(gram._BACKWARD_TILE_ELEMENTS, dpad, TORCH[element])},
        )
        for source in (forward, backward):
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": gram._NUM_WARPS})
    """
)


@pytest.mark.skipif(CUDA, reason="the CUDA test class runs the compiled kernels")
def test_kernels_compile_for_hopper():
    """Without a GPU, still compile both kernels for sm_90 (the interpreter checks no GPU rules)."""
    run_script(_COMPILE_SCRIPT, TRITON_DEFAULT_FP_FUSION="1")