"""The compiled extension nio_fast._C against plain PyTorch references (fp64 flatten/cat/matmul).

Run ``python tests/test_extension.py --bench`` for the ResNet-50-shaped timing (not a test).
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_extension():
    """nio_fast._C, or the built .so loaded on its own when the package __init__ cannot import."""
    try:
        return importlib.import_module("nio_fast._C")
    except ImportError:
        built = sorted(glob.glob(os.path.join(REPO, "nio_fast", "_C*.so")) + glob.glob(os.path.join(REPO, "nio_fast", "_C*.pyd")))
        if not built:
            raise
        spec = importlib.util.spec_from_file_location("nio_fast._C", built[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


C = load_extension()

VARIANTS = ["baseline"] + (["avx2"] if C._cpu_kernel_variant() == "avx2" else [])


@pytest.fixture(params=VARIANTS)
def variant(request):
    """Run a test with each CPU kernel variant this machine supports."""
    C._set_cpu_kernel_variant(request.param)
    yield request.param
    C._set_cpu_kernel_variant("auto")


# ----------------------------------------------------------------------------- references


def flat64(tensors):
    return torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]) if tensors else torch.zeros(0, dtype=torch.float64)


def reference_gram(grads):
    X = torch.stack([flat64(g) for g in grads])
    return X @ X.T


def reference_backward(grads, S):
    """fp64 S @ X split back into tensors, and the error scale |S| @ |X| of every output element."""
    X = torch.stack([flat64(g) for g in grads])
    S64 = S.to(torch.float64)
    return S64 @ X, S64.abs() @ X.abs()


def gram_error(G, grads):
    """Largest |G - G_ref| / sqrt(G_ref[i, i] G_ref[j, j]) (the Cauchy-Schwarz scale of entry i, j)."""
    ref = reference_gram(grads)
    scale = torch.sqrt(torch.outer(ref.diagonal(), ref.diagonal())).clamp_min(1e-300)
    return ((G.to(torch.float64) - ref).abs() / scale).max().item()


def backward_error(outputs, grads, S):
    Y, scale = reference_backward(grads, S)
    got = torch.stack([flat64(o) for o in outputs])
    return ((got - Y).abs() / scale.clamp_min(1e-300)).max().item() if Y.numel() else 0.0


def random_grads(shapes, D, dtype=torch.float32):
    return [[torch.randn(shape, dtype=torch.float64).to(dtype) for shape in shapes] for _ in range(D)]


def check_outputs_like_inputs(outputs, grads):
    assert len(outputs) == len(grads)
    for out_row, grad_row in zip(outputs, grads):
        assert len(out_row) == len(grad_row)
        for out, grad in zip(out_row, grad_row):
            assert out.shape == grad.shape and out.dtype == grad.dtype
            assert out.stride() == torch.empty_like(grad).stride()


def check_gram_and_backward(grads, rtol, expect_dtype=None):
    D = len(grads)
    G = C.gram_forward(grads)
    assert G.shape == (D, D)
    if expect_dtype is not None:
        assert G.dtype == expect_dtype
    assert torch.equal(G, G.T)
    assert gram_error(G, grads) <= rtol
    S = torch.randn(D, D, dtype=torch.float64)
    outputs = C.gram_backward(grads, S)
    check_outputs_like_inputs(outputs, grads)
    assert backward_error(outputs, grads, S) <= rtol
    return G, outputs


RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FEW_SHAPES = [(37, 29), (1,), (0, 4), (5,), (3, 1, 7), (4099,)]


# ----------------------------------------------------------------------------- gram forward / backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# 5 and 7 straddle the CPU kernels' switch from all-pairs to register tiles.
@pytest.mark.parametrize("D", [2, 3, 4, 5, 7, 8, 16, 64])
def test_gram_matches_reference(D, dtype, variant):
    grads = random_grads(FEW_SHAPES, D, dtype)
    check_gram_and_backward(grads, RTOL[dtype], expect_dtype=dtype)


@pytest.mark.parametrize("D", [2, 4, 64])
def test_single_parameter(D, variant):
    check_gram_and_backward(random_grads([(20011,)], D), RTOL[torch.float32])


@pytest.mark.parametrize("D", [3, 64])
def test_single_element_parameters(D):
    check_gram_and_backward(random_grads([(1,), (1, 1), ()], D, torch.float64), RTOL[torch.float64])


@pytest.mark.parametrize("D", [3, 16])
def test_many_tiny_parameters(D, variant):
    sizes = torch.randint(0, 20, (500,)).tolist()
    check_gram_and_backward(random_grads([(size,) for size in sizes], D), RTOL[torch.float32])


def test_all_parameters_empty():
    grads = random_grads([(0,), (3, 0)], 4)
    G, outputs = check_gram_and_backward(grads, 0.0, expect_dtype=torch.float32)
    assert torch.equal(G, torch.zeros(4, 4))
    assert C.gram_forward([[], [], []]).shape == (3, 3)


def test_large_tensor_among_tiny_ones():
    """One tensor spanning many work groups next to tiny ones (the thread-balance case)."""
    shapes = [(3,), (300_007,), (2,), (1,), (17, 5)]
    check_gram_and_backward(random_grads(shapes, 4), RTOL[torch.float32])


def non_contiguous_grads(D):
    """Per parameter: dense permuted (walkable in place), gaps, expanded, layouts differing across d."""
    grads = []
    for d in range(D):
        transposed = torch.randn(9, 13).t()
        permuted = torch.randn(3, 4, 5).permute(2, 0, 1)
        gapped = torch.randn(10, 12)[:, ::3]
        sliced_rows = torch.randn(10, 7)[2:8]  # offset, dense
        expanded = torch.randn(6, 1).expand(6, 5)
        mixed_layout = torch.randn(8, 3) if d % 2 == 0 else torch.randn(3, 8).t()
        size_one_stride = torch.empty_strided((5, 1, 3), (3, 99, 1)).normal_()
        grads.append([transposed, permuted, gapped, sliced_rows, expanded, mixed_layout, size_one_stride])
    return grads


@pytest.mark.parametrize("D", [2, 5])
def test_non_contiguous_inputs(D, variant):
    grads = non_contiguous_grads(D)
    _, outputs = check_gram_and_backward(grads, RTOL[torch.float32])
    assert outputs[0][0].stride() == grads[0][0].stride(), "dense permuted output keeps the input's strides"
    assert outputs[0][4].is_contiguous(), "an expanded input gets a dense output"


def test_non_contiguous_inputs_are_not_modified():
    grads = non_contiguous_grads(3)
    before = [[t.clone() for t in g] for g in grads]
    C.gram_forward(grads)
    C.gram_backward(grads, torch.randn(3, 3))
    for g, b in zip(grads, before):
        for t, u in zip(g, b):
            assert torch.equal(t, u)


def test_negated_views_are_resolved():
    grads = random_grads([(7, 3)], 2)
    negated = [[torch._neg_view(g[0])] for g in grads]
    assert negated[0][0].is_neg()
    check_gram_and_backward(negated, RTOL[torch.float32])


def test_mixed_dtypes_in_one_call(variant):
    shapes = [(33, 7), (129,), (5, 5), (1000,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    D = 4
    grads = [[torch.randn(s).to(t) for s, t in zip(shapes, dtypes)] for _ in range(D)]
    G = C.gram_forward(grads)
    assert G.dtype == torch.float64
    assert gram_error(G, grads) <= RTOL[torch.float32]
    S = torch.randn(D, D, dtype=torch.float64)
    outputs = C.gram_backward(grads, S)
    check_outputs_like_inputs(outputs, grads)
    # fp32 math; half / bfloat16 outputs add one rounding (unit roundoff 2^-11 / 2^-8).
    rounding = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
    for p, dtype in enumerate(dtypes):
        error = backward_error([[o[p]] for o in outputs], [[g[p]] for g in grads], S)
        assert error <= RTOL[torch.float32] + rounding[dtype], (dtype, error)

    without_fp64 = [g[:3] for g in grads]
    G = C.gram_forward(without_fp64)
    assert G.dtype == torch.float32
    assert gram_error(G, without_fp64) <= RTOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [2, 4, 16])
def test_low_precision_within_twice_torch_own_error(D, dtype, variant):
    grads = random_grads([(41, 17), (3,), (2049,)], D, dtype)
    # torch's own low-precision computation of the same quantities, against fp64 on the same inputs.
    X = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in grads])
    torch_gram_error = gram_error(X @ X.T, grads)
    S = torch.randn(D, D, dtype=torch.float64)
    torch_out = S.to(dtype) @ X
    Y, scale = reference_backward(grads, S)
    torch_backward_error = ((torch_out.double() - Y).abs() / scale).max().item()
    assert torch_gram_error > 0 and torch_backward_error > 0

    assert gram_error(C.gram_forward(grads), grads) <= 2 * torch_gram_error
    outputs = C.gram_backward(grads, S)
    check_outputs_like_inputs(outputs, grads)
    assert backward_error(outputs, grads, S) <= 2 * torch_backward_error


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_conversions_are_exact(dtype, variant):
    """Every finite value survives in -> fp32 -> out, and fp32 -> low rounds like torch."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype)
    values = values[torch.isfinite(values)]
    identity = C.gram_backward([[values]], torch.ones(1, 1))[0][0]
    assert torch.equal(identity, values)
    third = 1.0 / 3.0
    scaled = C.gram_backward([[values]], torch.full((1, 1), third))[0][0]
    assert torch.equal(scaled, (values.float() * torch.tensor(third, dtype=torch.float32)).to(dtype))


def test_deterministic_across_runs_and_thread_counts():
    grads = random_grads([(70_001,), (3, 3), (50_000,)], 8)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append((C.gram_forward(grads), C.tensor_dots(grads[0], grads[1])))
            results.append((C.gram_forward(grads), C.tensor_dots(grads[0], grads[1])))
    finally:
        torch.set_num_threads(threads)
    for G, dots in results[1:]:
        assert torch.equal(G, results[0][0]) and torch.equal(dots, results[0][1])


def test_accepts_tuples_and_tensors_requiring_grad():
    leaf = torch.randn(4, 5, requires_grad=True)
    other = torch.randn(4, 5)
    G = C.gram_forward(((leaf, ), (other, )))
    assert not G.requires_grad
    assert gram_error(G, [[leaf.detach()], [other]]) <= RTOL[torch.float32]


# ----------------------------------------------------------------------------- work table


def test_work_table_format():
    block = 8
    shapes = [(0,), (1,), (7,), (8,), (3, 3), (0, 5), (17,)]
    grads = random_grads(shapes, 3)
    for g in grads:
        g.append(torch.randn(5, 4).t())  # dense permuted: walkable, address = data_ptr
    shapes.append((4, 5))
    addresses, rows = C.build_work_table(grads, block)
    assert addresses.dtype == torch.int64 and rows.dtype == torch.int64
    assert addresses.shape == (len(shapes), 3) and rows.shape[1] == 3
    assert addresses.is_contiguous() and rows.is_contiguous()
    assert addresses.tolist() == [[grads[d][p].data_ptr() for d in range(3)] for p in range(len(shapes))]

    expected_rows = []
    for p, shape in enumerate(shapes):
        numel = math.prod(shape)
        expected_rows += [[p, first, min(block, numel - first)] for first in range(0, numel, block)]
    assert rows.tolist() == expected_rows
    coverage = [torch.zeros(math.prod(s), dtype=torch.int64) for s in shapes]
    for p, first, count in rows.tolist():
        coverage[p][first:first + count] += 1
    assert all(bool((c == 1).all()) for c in coverage), "every element exactly once"


def test_work_table_matches_python_twin():
    twin = pytest.importorskip("nio_fast.kernels.work_table")
    grads = random_grads([(5,), (0,), (20,), (3, 7)], 2)
    for block in (1, 8, 4096):
        for mine, theirs in zip(C.build_work_table(grads, block), twin.build_work_table(grads, block)):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_work_table_edge_cases():
    addresses, rows = C.build_work_table([[], []], 16)
    assert addresses.shape == (0, 2) and rows.shape == (0, 3)
    assert addresses.device.type == "cpu"
    with pytest.raises(ValueError, match="block must be >= 1"):
        C.build_work_table(random_grads([(3,)], 2), 0)
    with pytest.raises(ValueError, match=r"grads\[0\]\[0\].*cannot be walked"):
        C.build_work_table([[torch.randn(4, 6)[:, ::2]], [torch.randn(4, 3)]], 8)
    with pytest.raises(TypeError, match="one dtype group"):
        C.build_work_table([[torch.randn(3), torch.randn(3).double()]], 8)


# ----------------------------------------------------------------------------- tensor_dots


def test_tensor_dots_matches_torch(variant):
    pairs = [
        (torch.randn(100_003), torch.randn(100_003)),
        (torch.randn(7, 5).t(), torch.randn(5, 7)),  # different layouts
        (torch.randn(6, 4).t(), torch.randn(6, 4).t()),  # same permuted layout
        (torch.randn(8, 1).expand(8, 3), torch.randn(8, 3)),
        (torch.randn(0, 3), torch.randn(0, 3)),
        (torch.randn(1), torch.randn(1)),
        (torch.randn(513).half(), torch.randn(513).bfloat16()),
        (torch.randn(300).double(), torch.randn(300)),
        (torch.randn(5000).bfloat16(), torch.randn(5000).bfloat16()),
    ]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    dots = C.tensor_dots(a, b)
    assert dots.dtype == torch.float64 and dots.shape == (len(pairs),)
    for p, (x, y) in enumerate(pairs):
        x64, y64 = x.reshape(-1).double(), y.reshape(-1).double()
        scale = (x64.norm() * y64.norm()).item()
        assert abs(dots[p].item() - torch.dot(x64, y64).item()) <= 1e-6 * scale + 1e-300
    assert C.tensor_dots([], []).shape == (0,)


# ----------------------------------------------------------------------------- argument errors


def test_errors_name_the_argument():
    ok = random_grads([(3,), (4, 2)], 2)
    with pytest.raises(ValueError, match="at least one gradient"):
        C.gram_forward([])
    with pytest.raises(ValueError, match=r"grads\[1\] has 1 tensors but grads\[0\] has 2"):
        C.gram_forward([ok[0], ok[1][:1]])
    with pytest.raises(ValueError, match=r"grads\[1\]\[1\] has shape \[2, 4\] but grads\[0\]\[1\] has shape \[4, 2\]"):
        C.gram_forward([ok[0], [ok[1][0], torch.randn(2, 4)]])
    with pytest.raises(TypeError, match=r"grads\[1\]\[0\] has dtype torch.float64 but grads\[0\]\[0\] has dtype torch.float32"):
        C.gram_forward([ok[0], [ok[1][0].double(), ok[1][1]]])
    with pytest.raises(TypeError, match=r"grads\[0\]\[0\] has dtype torch.int64"):
        C.gram_forward([[torch.arange(3)], [torch.arange(3)]])
    with pytest.raises(RuntimeError, match=r"grads\[1\]\[0\] is on meta but grads\[0\]\[0\] is on cpu"):
        C.gram_forward([ok[0], [torch.empty(3, device="meta"), ok[1][1]]])
    with pytest.raises(RuntimeError, match="not supported"):
        C.gram_forward([[torch.empty(3, device="meta")]])
    with pytest.raises(ValueError, match=r"S must have shape \[2, 2\]"):
        C.gram_backward(ok, torch.randn(3, 3))
    with pytest.raises(TypeError, match="S has dtype torch.int64"):
        C.gram_backward(ok, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"a has 2 tensors but b has 1"):
        C.tensor_dots(ok[0], ok[1][:1])
    with pytest.raises(ValueError, match=r"a\[1\] has shape \[4, 2\] but b\[1\] has shape \[8\]"):
        C.tensor_dots(ok[0], [ok[1][0], torch.randn(8)])
    with pytest.raises(TypeError, match=r"b\[0\] has dtype torch.int32"):
        C.tensor_dots(ok[0][:1], [torch.ones(3, dtype=torch.int32)])


def test_cuda_compiled_flag():
    assert isinstance(C.cuda_compiled(), bool)
    if torch.version.cuda is None:
        assert C.cuda_compiled() is False


# ----------------------------------------------------------------------------- CUDA sources


CUDA_SOURCES = sorted(glob.glob(os.path.join(REPO, "csrc", "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_standalone():
    """What CI checks: every .cu compiles with plain nvcc (no PyTorch headers)."""
    assert CUDA_SOURCES, "no CUDA sources in csrc/"
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [
            subprocess.Popen(
                ["nvcc", "-std=c++17", "-O2", "-c", source, "-o", os.path.join(tmp, os.path.basename(source) + ".o")],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for source in CUDA_SOURCES
        ]
        failures = [(source, job.communicate()[0]) for source, job in zip(CUDA_SOURCES, jobs)]
        failures = [(source, log) for (source, log), job in zip(failures, jobs) if job.returncode != 0]
    assert not failures, "\n".join(f"{source}:\n{log}" for source, log in failures)


@pytest.mark.skipif(not (torch.cuda.is_available() and C.cuda_compiled()), reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [2, 3, 4, 8, 9, 16, 64])
def test_cuda_matches_cpu(D, dtype):
    shapes = [(37, 29), (1,), (0, 4), (5,), (3, 1, 7), (70_001,), (9, 13)]
    cpu_grads = random_grads(shapes, D, dtype)
    for g in cpu_grads:
        g.append(torch.randn(10, 12)[:, ::3].to(dtype))  # needs a copy
    cuda_grads = [[t.cuda() for t in g] for g in cpu_grads]
    rtol = {torch.float64: 1e-10}.get(dtype, 1e-5)
    G = C.gram_forward(cuda_grads)
    assert G.device.type == "cuda"
    assert gram_error(G.cpu(), cpu_grads) <= rtol
    assert torch.equal(G, C.gram_forward(cuda_grads)), "deterministic"
    S = torch.randn(D, D, dtype=torch.float64)
    outputs = C.gram_backward(cuda_grads, S.cuda())
    check_outputs_like_inputs(outputs, cuda_grads)
    cpu_outputs = C.gram_backward(cpu_grads, S)
    low = dtype in (torch.float16, torch.bfloat16)
    for out_row, cpu_row in zip(outputs, cpu_outputs):
        for out, expected in zip(out_row, cpu_row):
            torch.testing.assert_close(out.cpu(), expected, rtol=1e-2 if low else rtol, atol=1e-2 if low else 1e-6)
    dots = C.tensor_dots(cuda_grads[0], cuda_grads[-1])
    assert dots.device.type == "cuda"
    torch.testing.assert_close(dots.cpu(), C.tensor_dots(cpu_grads[0], cpu_grads[-1]), rtol=1e-5, atol=1e-6)
    addresses, rows = C.build_work_table([g[:2] for g in cuda_grads], 64)
    assert addresses.device == cuda_grads[0][0].device and rows.device == addresses.device


# ----------------------------------------------------------------------------- benchmark (not a test)


def resnet50_shapes():
    """The 161 parameter shapes of torchvision's resnet50 (25,557,032 values)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def benchmark(D=4, repeats=9):
    shapes = resnet50_shapes()
    assert len(shapes) == 161 and sum(math.prod(s) for s in shapes) == 25_557_032
    torch.manual_seed(0)
    grads = [[torch.randn(s) for s in shapes] for _ in range(D)]
    S = torch.randn(D, D)

    def reference_forward():
        X = torch.stack([torch.cat([t.reshape(-1) for t in g]) for g in grads])
        return X @ X.T, X

    def reference_forward_backward():
        G, X = reference_forward()
        Y = S @ X
        sizes = [math.prod(s) for s in shapes]
        return G, [[c.view(s) for c, s in zip(torch.split(Y[d], sizes), shapes)] for d in range(D)]

    cases = {
        "reference forward": reference_forward,
        "nio_fast._C forward": lambda: C.gram_forward(grads),
        "reference forward+backward": reference_forward_backward,
        "nio_fast._C forward+backward": lambda: (C.gram_forward(grads), C.gram_backward(grads, S)),
    }
    times = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved, so machine noise hits every case alike
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}  # first run warms up
    print(f"ResNet-50 shapes, D={D}, fp32, {torch.get_num_threads()} threads, CPU kernels: {C._cpu_kernel_variant()}")
    for name, ms in median.items():
        print(f"  {name:30s} {ms:9.1f} ms (median of {repeats - 1})")
    print(f"  speed-up forward {median['reference forward'] / median['nio_fast._C forward']:.2f}x, "
          f"forward+backward {median['reference forward+backward'] / median['nio_fast._C forward+backward']:.2f}x")


if __name__ == "__main__":
    if "--bench" in sys.argv:
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            benchmark(D=int(os.environ.get("NIO_BENCH_D", "4")))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
