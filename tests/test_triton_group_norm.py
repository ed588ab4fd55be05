"""The Triton GroupNorm kernels (nio_fast.kernels.group_norm) against the plain twins of
nio_fast.ops.group_norm, and ops.group_norm(backend="triton") end to end against F.group_norm.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported): tiny odd shapes; a block of 16 elements makes the spatial loop take several steps.
"""
from __future__ import annotations

import os
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402

from nio_fast import ops  # noqa: E402
from nio_fast.kernels import group_norm as kernels  # noqa: E402
from hopper_compile import run_script  # noqa: E402
from triton_checks import CUDA, DEVICE, NEEDS_A_DEVICE, assert_near, random  # noqa: E402

pytestmark = NEEDS_A_DEVICE

CASES = [((3, 6, 5, 7), 3), ((2, 8), 2), ((2, 4, 3, 2, 3), 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_kernels_equal_the_twins(monkeypatch, dtype, shape, groups, affine):
    monkeypatch.setattr(kernels, "_BLOCK", 16)  # several spatial blocks per channel (35 elements)
    gen = torch.Generator().manual_seed(len(shape) * 3 + groups)
    x, grad_out, u = (random(shape, dtype, gen) for _ in range(3))
    p, q = (random(shape[:2], dtype, gen) for _ in range(2))
    weight = random(shape[1:2], dtype, gen) if affine else None
    n, c = shape[:2]
    _, mean, rstd = torch.native_group_norm(x, None, None, n, c, x.numel() // (n * c), groups, 1e-5)
    for ours, theirs in zip(kernels.group_norm_backward(grad_out, x, mean, rstd, weight, groups),
                            ops.group_norm_backward_reference(grad_out, x, weight, groups, 1e-5)):
        assert_near(ours, theirs, dtype)
    for cotangents in ((u, p, q), (u, None, None), (None, p, None), (None, None, q)):
        for ours, theirs in zip(kernels.group_norm_double_backward(grad_out, x, mean, rstd, weight, groups,
                                                                   *cotangents),
                                ops.group_norm_double_backward_reference(grad_out, x, weight, groups, 1e-5,
                                                                         *cotangents)):
            assert_near(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_backend_end_to_end_equals_f_group_norm(dtype):
    gen = torch.Generator().manual_seed(23)
    x, cotangent = (random((3, 6, 4, 5), dtype, gen) for _ in range(2))
    weight, bias = (random((6,), dtype, gen) for _ in range(2))

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        grads = torch.autograd.grad((fn(*leaves) * cotangent).sin().sum(), leaves, create_graph=True)
        return [*grads, *torch.autograd.grad(sum((g * g).sum() for g in grads), leaves, allow_unused=True)]

    for ours, theirs in zip(run(lambda x, w, b: ops.group_norm(x, 3, w, b, backend="triton")),
                            run(lambda x, w, b: F.group_norm(x, 3, w, b))):
        if theirs is not None:
            assert_near(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_weight_per_sample_equals_the_product_with_x_hat(dtype):
    gen = torch.Generator().manual_seed(29)
    x, grad_out = (random((3, 6, 4, 5), dtype, gen) for _ in range(2))
    cotangent = random((3, 6), dtype, gen)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (grad_out, x)]
        rows = fn(*leaves)
        return [rows, *torch.autograd.grad(rows, leaves, cotangent)]

    for ours, theirs in zip(run(lambda g, x: ops.group_norm_weight_per_sample(g, x, 3, backend="triton")),
                            run(lambda g, x: (g * F.group_norm(x, 3)).reshape(3, 6, -1).sum(-1))):
        assert_near(ours, theirs, dtype)


def test_a_named_backend_that_cannot_run_is_refused():
    with pytest.raises(ValueError, match="backend: 'triton' group_norm kernels need float32/float64"):
        ops.group_norm(torch.randn(2, 4, 3, dtype=torch.float16, device=DEVICE), 2, backend="triton")


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.compiler import ASTSource
    from hopper_compile import NO_NVIDIA_BACKEND, compile_and_report
    if "nvidia" not in triton.backends.backends:
        sys.exit(NO_NVIDIA_BACKEND)
    from nio_fast.kernels import group_norm as gn

    for pointer in ("*fp32", "*fp64"):
        sizes = {"C": "i32", "HW": "i32", "G": "i32", "CG": "i32"}
        backward = ASTSource(
            fn=gn._backward_kernel,
            signature={**{name: pointer for name in ("gy_ptr", "x_ptr", "mean_ptr", "rstd_ptr", "gamma_ptr",
                                                     "gx_ptr", "gw_ptr", "gb_ptr")}, **sizes,
                       "HAS_GAMMA": "constexpr", "BLOCK": "constexpr"},
            constexprs={"HAS_GAMMA": True, "BLOCK": gn._BLOCK},
        )
        compile_and_report(f"{pointer} backward", backward, gn._NUM_WARPS)
        double = ASTSource(
            fn=gn._double_backward_kernel,
            signature={**{name: pointer for name in ("gy_ptr", "x_ptr", "mean_ptr", "rstd_ptr", "gamma_ptr", "u_ptr",
                                                     "p_ptr", "q_ptr", "d_gy_ptr", "d_x_ptr", "d_w_ptr",
                                                     "sums_ptr")}, **sizes,
                       "HAS_GAMMA": "constexpr", "HAS_U": "constexpr", "HAS_P": "constexpr", "HAS_Q": "constexpr",
                       "BLOCK": "constexpr"},
            constexprs={"HAS_GAMMA": True, "HAS_U": True, "HAS_P": True, "HAS_Q": True, "BLOCK": gn._BLOCK},
        )
        compile_and_report(f"{pointer} double_backward", double, gn._NUM_WARPS)
    """
)


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled by the tests above")
def test_kernels_compile_for_hopper():
    """Without a GPU, still compile the kernels for sm_90 (the interpreter checks none of the GPU rules)."""
    print(run_script(_COMPILE_SCRIPT))  # registers and stack (spills) per kernel, shown with -s
