"""The CPU allocation cache (nio_fast.cpu_memory, csrc/cpu_allocation_cache.cpp): blocks reused
inside a span, freed after, bounded, thread- and fork-safe, invisible in values and in the
profiler's memory accounting."""
import multiprocessing
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nio_fast
from nio_fast import availability
from nio_fast.cpu_memory import cache_stats, cached_cpu_memory

from models import GroupNormResNet, TinyTransformer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"  # harness: how the benchmarks read the profiler
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

pytestmark = pytest.mark.skipif(availability.extension() is None, reason="needs the C++ extension")

BIG = 1 << 18  # float32 values: 1 MB, well above the 16 KB the cache starts at


@pytest.fixture(autouse=True)
def _enabled(monkeypatch):
    monkeypatch.delenv("NIO_FAST_CPU_CACHE", raising=False)
    assert cache_stats()["depth"] == 0


def test_a_freed_block_is_handed_out_again_inside_a_span():
    with cached_cpu_memory() as on:
        assert on
        first = torch.randn(BIG)
        address = first.data_ptr()
        del first
        assert cache_stats()["kept_bytes"] == BIG * 4
        second = torch.randn(BIG)
        assert second.data_ptr() == address
        stats = cache_stats()
        assert stats["reuses"] == 1 and stats["kept_bytes"] == 0
        odd = torch.empty(BIG + 3)  # another page-rounded size: a fresh block
        assert odd.data_ptr() != address
    assert cache_stats()["kept_bytes"] == 0


def test_small_blocks_and_empty_tensors_pass_through():
    with cached_cpu_memory():
        before = cache_stats()
        small = torch.ones(100)
        empty = torch.empty(0)
        assert small.sum().item() == 100 and empty.numel() == 0
        after = cache_stats()
        assert (after["fresh"], after["reuses"], after["in_use_bytes"]) == \
            (before["fresh"], before["reuses"], before["in_use_bytes"])


def test_spans_nest_and_the_outermost_frees_what_it_kept():
    with cached_cpu_memory():
        with cached_cpu_memory():
            assert cache_stats()["depth"] == 2
            del_me = torch.empty(BIG)
            del del_me
        stats = cache_stats()
        assert stats["depth"] == 1 and stats["kept_bytes"] == BIG * 4  # the inner span keeps it
    stats = cache_stats()
    assert stats["depth"] == 0 and stats["kept_bytes"] == 0


def test_kept_bytes_never_exceed_twice_the_spans_peak_in_use():
    """Distinct sizes, each freed before the next: without the bound the cache would hold them all."""
    with cached_cpu_memory():
        for pages in range(64, 96):
            block = torch.empty(pages * 1024)  # float32: `pages` pages of 4 KB
            del block
        stats = cache_stats()
        assert 0 < stats["kept_bytes"] <= 2 * stats["peak_in_use_bytes"]
        assert stats["kept_bytes"] < sum(pages * 4096 for pages in range(64, 96))  # some were freed


def test_tensors_outliving_the_span_are_freed_not_kept():
    with cached_cpu_memory():
        survivor = torch.randn(BIG)
    in_use = cache_stats()["in_use_bytes"]
    expected = survivor.clone()
    assert torch.equal(survivor, expected)
    del survivor
    stats = cache_stats()
    assert stats["in_use_bytes"] == in_use - BIG * 4 and stats["kept_bytes"] == 0


def test_the_environment_switch_turns_spans_off(monkeypatch):
    monkeypatch.setenv("NIO_FAST_CPU_CACHE", "0")
    with cached_cpu_memory() as on:
        assert not on and cache_stats()["depth"] == 0
        block = torch.empty(BIG)
        del block
        assert cache_stats()["kept_bytes"] == 0


def test_an_exception_inside_still_closes_the_span():
    with pytest.raises(ValueError):
        with cached_cpu_memory():
            torch.empty(BIG)
            raise ValueError("inside")
    assert cache_stats()["depth"] == 0 and cache_stats()["kept_bytes"] == 0


def test_the_profiler_still_counts_every_allocation_and_free():
    """What the benchmarks' allocator peaks read (harness.allocation_events): a reused block is
    reported allocated and freed like a fresh one."""
    import harness

    def allocate_and_free():
        block = torch.empty(BIG)
        del block

    with cached_cpu_memory():
        allocate_and_free()  # the block the profiled call gets back from the cache
        events, _ = harness.allocation_events(allocate_and_free)
        assert cache_stats()["reuses"] >= 1
    assert sorted(event.extra_fields.alloc_size for event in events) == [-BIG * 4, BIG * 4]


def test_threads_share_a_span():
    errors = []

    def churn(seed):
        try:
            generator = torch.Generator().manual_seed(seed)
            for step in range(50):
                a = torch.randn(BIG + 1024 * (step % 3), generator=generator)
                b = a * 2
                assert torch.equal(b / 2, a)
        except Exception as error:  # reported by the main thread
            errors.append(error)

    with cached_cpu_memory():
        in_use = cache_stats()["in_use_bytes"]
        threads = [threading.Thread(target=churn, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        stats = cache_stats()
        assert stats["in_use_bytes"] == in_use and stats["reuses"] > 0


def _child_stats(queue):
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool does not survive fork
    block = torch.randn(BIG)
    queue.put((cache_stats()["depth"], float(block.square().mean() > 0)))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_starts_outside_any_span():
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with cached_cpu_memory():
        kept = torch.empty(BIG)
        del kept
        child = context.Process(target=_child_stats, args=(queue,))
        child.start()
        depth, ran = queue.get(timeout=60)
        child.join(timeout=60)
    assert child.exitcode == 0 and depth == 0 and ran == 1.0


def test_onednn_blocks_freed_across_spans():
    """ATen's oneDNN glue frees raw blocks through the current CPU allocator: blocks made before,
    inside and after spans all come back through the cache's deleter."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    expected = torch.autograd.grad(conv(x).square().sum(), x)[0]
    for _ in range(3):
        with cached_cpu_memory():
            inside = torch.autograd.grad(conv(x).square().sum(), x)[0]
        after = torch.autograd.grad(conv(x).square().sum(), x)[0]
        assert torch.equal(inside, expected) and torch.equal(after, expected)


@pytest.mark.parametrize("name,model_fn,batch", [
    ("group_norm_resnet", lambda: GroupNormResNet(channels=16), lambda: (torch.randn(16, 3, 16, 16, dtype=torch.float64),
                                                                         torch.randint(0, 5, (16,)))),
    ("transformer", lambda: TinyTransformer(dim=64), lambda: (torch.randint(0, 20, (16, 12)), torch.randint(0, 5, (16,)))),
])
@pytest.mark.parametrize("sub_batches", [4, "samples"])
def test_initialize_gives_the_same_bits_with_and_without_the_cache(monkeypatch, name, model_fn, batch, sub_batches):
    """The plain twin is PyTorch's allocator: only where the bytes live differs."""
    data = batch()
    depths = []

    def loss_fn(outputs, targets):
        depths.append(cache_stats()["depth"])
        return F.cross_entropy(outputs, targets)

    results = {}
    for switch in ("0", "1"):
        monkeypatch.setenv("NIO_FAST_CPU_CACHE", switch)
        torch.manual_seed(0)
        model = model_fn().double()
        model.train(False)
        nio_fast.initialize(model, data, loss_fn, iters=3, sub_batches=sub_batches, progress=False, seed=0)
        results[switch] = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(results["0"], results["1"]))
    assert max(depths) == 1 and cache_stats()["depth"] == 0  # the run was a span, closed after
