"""Distributed NIO: bytes communicated and seconds per iteration, by world size.

    python benchmarks/distributed.py                        # W = 1, 2, 4 gloo processes on this machine's CPU
                                                            # -> results/distributed.{json,md}
    torchrun --nproc_per_node=8 benchmarks/distributed.py   # one process per GPU (NCCL; gloo without CUDA)
                                                            # -> results/distributed_torchrun.{json,md}

The same global batch (N samples, D chunks) is split over W ranks; each rank forwards N / W
samples. Bytes are counted twice: by nio_fast (``report.distributed``) and by wrapping
``torch.distributed.all_reduce`` / ``all_to_all_single`` here (the bytes handed to every
collective; for the all-to-all, the part that leaves the rank). Seconds per iteration are the
slowest rank's, after a warm-up call.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_results  # noqa: E402
from networks import images, make  # noqa: E402

import nio_fast  # noqa: E402

MODEL = "resnet20_gn"


class CollectiveCounter:
    """Counts the bytes this process hands to torch.distributed's collectives."""

    def __init__(self):
        self.bytes = 0
        self.calls = 0
        self.seconds = 0.0
        all_reduce, all_to_all = dist.all_reduce, dist.all_to_all_single

        def timed(call, *args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        def counted_all_reduce(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            self.calls += 1
            return timed(all_reduce, tensor, *args, **kwargs)

        def counted_all_to_all(output, input, *args, group=None, **kwargs):
            world = dist.get_world_size(group)
            self.bytes += input.numel() * input.element_size() * (world - 1) // world
            self.calls += 1
            return timed(all_to_all, output, input, *args, group=group, **kwargs)

        dist.all_reduce, dist.all_to_all_single = counted_all_reduce, counted_all_to_all


def formula_bytes(world: int, chunks: int, numel: int, tensors: int, element: int = 4) -> int:
    """The module docstring's count for fp32 parameters (fp32 Gram, fp64 scale gradients)."""
    if world == 1:
        return 0
    exchange = 2 * (chunks // world) * math.ceil(numel / world) * (world - 1) * element
    return exchange + (chunks * chunks + world) * element + (tensors + world) * 8


def measure(rank: int, world: int, batch: int, chunks: int, iters: int, device: torch.device) -> dict:
    """One rank's run: a warm-up call, then ``iters`` timed iterations."""
    counter = CollectiveCounter() if world > 1 else None
    inputs, targets = images(batch)
    rows = slice(rank * batch // world, (rank + 1) * batch // world)
    part = (inputs[rows].to(device), targets[rows].to(device))
    nio_fast.initialize(make(MODEL).to(device), part, iters=1, sub_batches=chunks, progress=False)
    counted_before = counter.bytes if counter else 0
    waited_before = counter.seconds if counter else 0.0
    model = make(MODEL).to(device)
    cpu_started = time.process_time()
    report = nio_fast.initialize(model, part, iters=iters, sub_batches=chunks, progress=False)
    cpu_seconds = time.process_time() - cpu_started
    numel = sum(p.numel() for p in model.parameters())
    gradient_bytes = numel * 4
    info = report.distributed or {}
    per_iteration = round(info.get("bytes_per_iteration") or 0)
    return {
        "model": MODEL, "world_size": world, "N": batch, "D": chunks, "per_rank": batch // world,
        "m": numel, "device": str(device),
        "bytes_per_iter": per_iteration,
        "formula_bytes": formula_bytes(world, chunks, numel, len(report.scales)),
        "counted_bytes_per_call": (counter.bytes - counted_before) if counter else 0,
        "gradient_bytes": gradient_bytes,
        # a ring all-reduce of one fp32 gradient moves 2 m (W-1)/W numbers per rank
        "ring_allreduces": per_iteration / (2 * gradient_bytes * (world - 1) / world) if world > 1 else 0.0,
        "collectives_per_iter": info.get("collective_calls", 0) / iters,
        "seconds_per_iter": report.seconds / iters,
        "rank0_cpu_seconds_per_iter": cpu_seconds / iters,  # this rank's own CPU time (gloo threads included)
        # rank 0's time inside collectives (transfer, and waiting for the slowest rank)
        "collective_seconds_per_iter": (counter.seconds - waited_before) / iters if counter else 0.0,
    }


def _spawned(rank: int, world: int, store: str, out: str, batch: int, chunks: int, iters: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
    row = measure(rank, world, batch, chunks, iters, torch.device("cpu"))
    if rank == 0:
        torch.save(row, Path(out) / "row.pt")
    if world > 1:
        dist.destroy_process_group()


def run_local(worlds: list[int], batch: int, chunks: int, iters: int) -> None:
    rows = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_spawned, args=(world, str(Path(tmp) / "store"), tmp, batch, chunks, iters), nprocs=world)
            rows.append(torch.load(Path(tmp) / "row.pt", weights_only=False))
        print(rows[-1], flush=True)
    base = rows[0]["seconds_per_iter"]
    for row in rows:
        row["speedup"] = base / row["seconds_per_iter"]
    notes = (f"{MODEL} (fp32), global batch N={batch} in D={chunks} chunks, {iters} timed iterations after a "
             "warm-up call; one CPU thread per rank, gloo. bytes_per_iter: what one rank hands to collectives per "
             "iteration (nio_fast's count; for the all-to-all the part that leaves the rank); formula_bytes: "
             "2 (D/W) ceil(m/W) (W-1) x 4 + (D^2 + W) x 4 + (P + W) x 8; counted_bytes_per_call: the same, "
             "counted by wrapping torch.distributed for the whole call (handshake included); ring_allreduces: "
             "bytes_per_iter over one ring all-reduce of the fp32 gradient (2 m (W-1)/W x 4 bytes); "
             "rank0_cpu_seconds_per_iter: rank 0's own CPU time (about the wall time with a free core per rank); "
             "collective_seconds_per_iter: rank 0's time inside collectives (transfer, and waiting for the "
             f"slowest rank). The ranks share this machine's {os.cpu_count()} cores with other work, so wall "
             "times at W >= 2 are contention-bound.")
    columns = ["world_size", "N", "D", "per_rank", "m", "bytes_per_iter", "formula_bytes", "counted_bytes_per_call",
               "ring_allreduces", "collectives_per_iter", "seconds_per_iter", "rank0_cpu_seconds_per_iter",
               "collective_seconds_per_iter", "speedup"]
    path = write_results("distributed", rows, columns, "Distributed NIO: bytes and seconds per iteration", notes)
    print(f"wrote {path}")


def run_torchrun(batch: int, chunks: int, iters: int) -> None:
    """Under torchrun: this process is one rank; NCCL on GPUs, gloo otherwise; rank 0 writes."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    row = measure(rank, world, batch, chunks, iters, device)
    if rank == 0:
        columns = ["world_size", "device", "N", "D", "per_rank", "m", "bytes_per_iter", "formula_bytes",
                   "ring_allreduces", "collectives_per_iter", "seconds_per_iter", "collective_seconds_per_iter"]
        print(row, flush=True)
        path = write_results("distributed_torchrun", [row], columns, "Distributed NIO under torchrun",
                             f"{MODEL} (fp32), global batch N={batch} in D={chunks} chunks, {iters} timed iterations.")
        print(f"wrote {path}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4", help="world sizes to spawn locally (default 1,2,4)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size N")
    parser.add_argument("--sub-batches", type=int, default=None, help="D (default: the largest world size; "
                        "under torchrun the world size)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        world = int(os.environ["WORLD_SIZE"])
        run_torchrun(args.batch, args.sub_batches or world, args.iters)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    run_local(worlds, args.batch, args.sub_batches or max(worlds), args.iters)


if __name__ == "__main__":
    main()
