"""The Triton kernel of attention's softmax double backward (nio_fast.kernels.attention) against
its plain twin (ops.attention's ``_softmax_second_order``), and ops.attention(backend="triton")
end to end against backend="torch".

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set before triton
is imported): tiny odd shapes; small tiles make a program take several rows and loop over keys.
"""
from __future__ import annotations

import importlib
import os
import textwrap

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from nio_fast import ops  # noqa: E402
from nio_fast.kernels import attention as kernels  # noqa: E402
from hopper_compile import run_script  # noqa: E402
from triton_checks import CUDA, DEVICE, NEEDS_A_DEVICE, assert_near, random  # noqa: E402
from norm_checks import derivatives  # noqa: E402

attention_module = importlib.import_module("nio_fast.ops.attention")  # (ops.attention is the function)
pytestmark = NEEDS_A_DEVICE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 1, 1), (2, 3, 37)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("tile", [(64, 1024), (8, 4)], ids=["one_tile_per_row_block", "key_loop"])
def test_kernel_equals_the_twin(monkeypatch, dtype, shape, tile):
    tile_values, max_block_keys = tile  # (8, 4): two rows of four keys per program, 37 keys in 10 steps
    monkeypatch.setattr(kernels, "_TILE_VALUES", tile_values)
    monkeypatch.setattr(kernels, "_MAX_BLOCK_KEYS", max_block_keys)
    gen = torch.Generator().manual_seed(sum(shape))
    p = torch.softmax(random(shape, torch.float64, gen) * 3, -1)
    p[(0,) * (len(shape) - 1)] = 0.0  # a fully masked row: zeros out, not NaN
    p = p.to(dtype)
    grad_p, unscaled_h, cot_p = (random(shape, dtype, gen) for _ in range(3))
    theirs = attention_module._softmax_second_order(p, grad_p.clone(), unscaled_h.clone(), cot_p.clone(), 0.37)
    ours = (grad_p.clone(), unscaled_h.clone(), cot_p.clone())
    kernels.attention_softmax_double_backward_(p, *ours, 0.37)
    for mine, reference in zip(ours, theirs):
        assert_near(mine, reference, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_triton_backend_end_to_end_equals_the_torch_formulas(dtype):
    gen = torch.Generator().manual_seed(31)
    q, k, v = (random(shape, dtype, gen) for shape in ((2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 3)))
    mask = torch.rand(5, 6, generator=gen) > 0.3
    mask[:, 0] = True
    mask = mask.to(DEVICE)
    cotangent = random((2, 3, 5, 3), dtype, gen)
    results = {backend: derivatives(lambda *t: ops.attention(*t, mask, backend=backend), (q, k, v), cotangent)
               for backend in ("torch", "triton")}
    for ours, theirs in zip(results["triton"], results["torch"]):
        assert_near(ours, theirs, dtype)


def test_bad_tensors_and_a_backend_that_cannot_run_are_refused():
    gen = torch.Generator().manual_seed(5)
    p, grad_p, unscaled_h, cot_p = (random((2, 3, 4), torch.float32, gen) for _ in range(4))
    with pytest.raises(ValueError, match="probabilities' shape"):
        kernels.attention_softmax_double_backward_(p, grad_p[:, :2].contiguous(), unscaled_h, cot_p, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.attention_softmax_double_backward_(p, grad_p.transpose(1, 2).contiguous().transpose(1, 2),
                                                   unscaled_h, cot_p, 1.0)
    with pytest.raises(ValueError, match="must not share memory"):
        kernels.attention_softmax_double_backward_(p, grad_p, grad_p, cot_p, 1.0)
    with pytest.raises(ValueError, match="backend: 'triton' attention kernels need float32/float64"):
        ops.attention(p.half(), p.half(), p.half(), backend="triton")


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.compiler import ASTSource
    from hopper_compile import NO_NVIDIA_BACKEND, compile_and_report
    if "nvidia" not in triton.backends.backends:
        sys.exit(NO_NVIDIA_BACKEND)
    from nio_fast.kernels import attention as at

    for pointer in ("*fp32", "*fp64"):
        for keys in (64, 197, 4096):  # the small ViT's, ViT-B/16's, and a row longer than a block
            block_keys = min(triton.next_power_of_2(keys), at._MAX_BLOCK_KEYS)
            source = ASTSource(
                fn=at._softmax_double_backward_kernel,
                signature={**{name: pointer for name in ("p_ptr", "dp_ptr", "h_ptr", "c_ptr", "scale_ptr")},
                           "rows": "i32", "keys": "i32", "BLOCK_ROWS": "constexpr", "BLOCK_KEYS": "constexpr"},
                constexprs={"BLOCK_ROWS": max(1, at._TILE_VALUES // block_keys), "BLOCK_KEYS": block_keys},
            )
            compile_and_report(f"{pointer} keys={keys}", source, at._NUM_WARPS)
    """
)


@pytest.mark.skipif(CUDA, reason="on CUDA the kernel is compiled by the tests above")
def test_kernel_compiles_for_hopper():
    """Without a GPU, still compile the kernel for sm_90 (the interpreter checks none of the GPU rules)."""
    print(run_script(_COMPILE_SCRIPT))  # registers and stack (spills) per kernel, shown with -s
