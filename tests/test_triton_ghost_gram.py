"""The fused Triton ghost route of ``outer_gram`` (nio_fast.kernels.ghost_gram) against the plain twin.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported), one numpy program at a time: the sizes are tiny and odd on purpose (masks), and the
cases few. The backend dispatch and its refusal are checked wherever Triton imports.
"""
from __future__ import annotations

import os
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from nio_fast import ops  # noqa: E402
from nio_fast.kernels import ghost_gram  # noqa: E402
from hopper_compile import run_script  # noqa: E402
from nio_fast.ops import factor_gram  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
RUNNABLE = INTERPRETING or CUDA
DEVICE = "cpu" if INTERPRETING else "cuda"
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="needs a CUDA GPU or TRITON_INTERPRET=1")

# Relative to the scale of each quantity (see the asserts): Gram entries to sqrt(G_ii G_jj)
# (their Cauchy-Schwarz bound), input gradients to the same sums taken over absolute values.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5}

# (N, T, d, p): N in {1, 3}, T in {1, 5}, d and p in {3, 7}; every size below the 16-wide tiles,
# so every load is masked. N = 3 also covers off-diagonal pairs and the mirror.
SIZES = [(1, 5, 7, 3), (3, 1, 3, 7), (3, 5, 7, 3)]


def factors(n, t, d, p, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, t, d, generator=gen, dtype=torch.float64).to(dtype)
    b = torch.randn(n, t, p, generator=gen, dtype=torch.float64).to(dtype)
    upstream = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return a, b, upstream


def bounds(a, b, sym):
    """|G| bound sqrt(G_ii G_jj) and the elementwise bounds of dA and dB: the backward sums over
    absolute values (fp64), i.e. what rounding errors are relative to."""
    a, b, sym = a.abs(), b.abs(), sym.abs()
    ka = torch.einsum("itd,jsd->itjs", a, a)
    kb = torch.einsum("itp,jsp->itjs", b, b)
    bound_a = torch.einsum("ij,itjs,jsd->itd", sym, kb, a)
    bound_b = torch.einsum("ij,itjs,jsp->itp", sym, ka, b)
    return bound_a, bound_b


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the kernel launches behind outer_gram (proves the Triton path ran)."""
    calls = {"ghost_gram_forward": 0, "ghost_gram_backward": 0}
    for name in calls:
        original = getattr(ghost_gram, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(ghost_gram, name, spy)
    return calls


def check(size, dtype, seed):
    a64, b64, upstream = factors(*size, torch.float64, seed)
    a = a64.to(dtype).to(DEVICE).requires_grad_()
    b = b64.to(dtype).to(DEVICE).requires_grad_()
    # The reference sees exactly the rounded inputs, in fp64.
    a_ref = a.detach().cpu().double().requires_grad_()
    b_ref = b.detach().cpu().double().requires_grad_()

    gram = ops.outer_gram(a, b, "ghost", backend="triton")
    expected = ops.outer_gram_reference(a_ref, b_ref)
    assert gram.shape == expected.shape and gram.device == a.device
    assert gram.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    diagonal = expected.detach().diagonal()
    scale = torch.sqrt(diagonal[:, None] * diagonal[None, :])
    error = (gram.detach().cpu().double() - expected.detach()).abs()
    rtol = RTOL[dtype]
    assert torch.all(error <= rtol * scale + 1e-300), f"Gram: max scaled error {(error / scale).max():.3e}"
    assert torch.equal(gram.detach(), gram.detach().T)

    grad_a, grad_b = torch.autograd.grad((gram * upstream.to(gram)).sum(), (a, b))
    ref_a, ref_b = torch.autograd.grad((expected * upstream).sum(), (a_ref, b_ref))
    bound_a, bound_b = bounds(a_ref.detach(), b_ref.detach(), upstream + upstream.T)
    rounding = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
    for name, ours, ref, bound, like in (("dA", grad_a, ref_a, bound_a, a), ("dB", grad_b, ref_b, bound_b, b)):
        assert ours.shape == like.shape and ours.dtype == like.dtype and ours.device == like.device
        error = (ours.cpu().double() - ref).abs()
        assert torch.all(error <= rtol * bound + rounding * ref.abs() + 1e-300), (
            f"{name}: max error {error.max():.3e}, bound {bound.max():.3e}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "N{}T{}d{}p{}".format(*s))
def test_forward_and_backward_match_the_reference(size, dtype, kernel_calls):
    check(size, dtype, seed=sum(size))
    assert kernel_calls == {"ghost_gram_forward": 1, "ghost_gram_backward": 1}


@needs_triton
def test_bf16_inputs(kernel_calls):
    """16-bit operands in the kernel-tile dots (upcast under the interpreter), fp32 accumulation."""
    check((3, 5, 7, 3), torch.bfloat16, seed=5)
    assert kernel_calls == {"ghost_gram_forward": 1, "ghost_gram_backward": 1}


@needs_triton
def test_strided_inputs_and_one_sided_backward():
    """Inputs read through their strides (a transposed view, no copy); only dB requested."""
    a64, b64, upstream = factors(3, 5, 3, 7, torch.float64, seed=11)
    a = a64.transpose(0, 1).contiguous().transpose(0, 1).to(DEVICE)  # [N, T, d], not contiguous
    b = b64.to(DEVICE).requires_grad_()
    assert not a.is_contiguous()
    gram = ops.outer_gram(a, b, "ghost", backend="triton")
    (grad_b,) = torch.autograd.grad((gram * upstream.to(gram)).sum(), (b,))
    b_ref = b64.clone().requires_grad_()
    expected = ops.outer_gram_reference(a64, b_ref)
    (ref_b,) = torch.autograd.grad((expected * upstream).sum(), (b_ref,))
    torch.testing.assert_close(gram.cpu(), expected.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_b.cpu(), ref_b, rtol=1e-10, atol=1e-10)


@needs_triton
def test_empty_batch():
    a, b = torch.randn(0, 5, 3, device=DEVICE), torch.randn(0, 5, 7, device=DEVICE)
    assert ops.outer_gram(a, b, "ghost", backend="triton").shape == (0, 0)


def test_triton_backend_refused_where_triton_cannot_run():
    """"meta" tensors: Triton runs on neither (CUDA tensors, or CPU ones under the interpreter)."""
    a, b = torch.empty(3, 5, 7, device="meta"), torch.empty(3, 5, 3, device="meta")
    for route in ("ghost", "materialize", "auto"):
        with pytest.raises(ValueError, match="backend"):
            ops.outer_gram(a, b, route, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.outer_gram(torch.randn(2, 3, 4), torch.randn(2, 3, 5), "ghost", backend="fast")


@pytest.mark.skipif(CUDA, reason="on CUDA auto takes Triton by design")
def test_auto_stays_on_torch_off_cuda(monkeypatch):
    """CPU (interpreter or not): the default never runs the Triton kernels."""
    def refuse(*args, **kwargs):
        raise AssertionError("Triton kernel called")

    monkeypatch.setattr(ghost_gram, "ghost_gram_forward", refuse)
    monkeypatch.setattr(ghost_gram, "ghost_gram_backward", refuse)
    a, b, upstream = factors(3, 5, 7, 3, torch.float64, seed=3)
    a.requires_grad_()
    gram = ops.outer_gram(a, b, "ghost")
    gram.backward(upstream)
    torch.testing.assert_close(gram, ops.outer_gram_reference(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_takes_triton_on_cuda_with_positions():
    a = torch.randn(3, 5, 7, device="cuda")
    assert factor_gram._ghost_backend("auto", a) == "triton"
    assert factor_gram._ghost_backend("auto", a[:, :1]) == "torch"


# ----------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import triton
    import triton.language as tl
    from triton.compiler import ASTSource
    from hopper_compile import NO_NVIDIA_BACKEND, compile_and_report
    if "nvidia" not in triton.backends.backends:
        sys.exit(NO_NVIDIA_BACKEND)
    from nio_fast.kernels import ghost_gram as gg

    POINTER = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
    DOT = {torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}
    sizes = dict(positions=1000, in_features=1000, out_features=1000)  # the largest tiles
    strides = {name: "i32" for name in ("stride_an", "stride_at", "stride_ad", "stride_bn", "stride_bt", "stride_bp")}
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        fwd = gg.forward_config(dtype=dtype, **sizes)
        bwd = gg.backward_config(dtype=dtype, **sizes)
        forward = ASTSource(
            fn=gg._ghost_forward_kernel,
            signature={"a_ptr": POINTER[dtype], "b_ptr": POINTER[dtype], "pair_i_ptr": "*i32", "pair_j_ptr": "*i32",
                       "out_ptr": POINTER[acc], "T": "i32", "D": "i32", "P": "i32", **strides,
                       "DOT_DTYPE": "constexpr", "ACC_DTYPE": "constexpr", "BLOCK_T": "constexpr",
                       "BLOCK_K": "constexpr"},
            constexprs={"DOT_DTYPE": DOT[dtype], "ACC_DTYPE": DOT[acc], "BLOCK_T": fwd["BLOCK_T"],
                        "BLOCK_K": fwd["BLOCK_K"]},
        )
        backward = ASTSource(
            fn=gg._ghost_backward_kernel,
            signature={"a_ptr": POINTER[dtype], "b_ptr": POINTER[dtype], "s_ptr": POINTER[acc],
                       "grad_a_ptr": POINTER[acc], "grad_b_ptr": POINTER[acc], "N": "i32", "T": "i32", "D": "i32",
                       "P": "i32", **strides, "DOT_DTYPE": "constexpr", "ACC_DTYPE": "constexpr",
                       "NEED_A": "constexpr", "NEED_B": "constexpr", "BLOCK_T": "constexpr", "BLOCK_K": "constexpr",
                       "WIDTH_A": "constexpr", "WIDTH_B": "constexpr"},
            constexprs={"DOT_DTYPE": DOT[dtype], "ACC_DTYPE": DOT[acc], "NEED_A": True, "NEED_B": True,
                        **{k: v for k, v in bwd.items() if k != "num_warps"}},
        )
        for name, source, config in (("forward", forward, fwd), ("backward", backward, bwd)):
            compile_and_report(f"{dtype} {name} {config}", source, config["num_warps"])
    """
)


@pytest.mark.skipif(CUDA, reason="on CUDA the kernels are compiled by the tests above")
def test_kernels_compile_for_hopper():
    """Without a GPU, still compile both kernels for sm_90 at their largest tiles (the interpreter
    checks none of the GPU rules)."""
    print(run_script(_COMPILE_SCRIPT))  # registers and stack (spills) per kernel, shown with -s
