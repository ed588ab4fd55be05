"""torch.distributed support for ``initialize`` and ``gradcosine`` (README, "Distributed runs").

What a distributed call computes
- Every rank passes its own part of each global batch; the global batch is the concatenation
  of the ranks' parts in rank order.
- ``sub_batches`` D must be a multiple of the world size W, and ``overlap`` must be 0: rank r
  splits its own rows into D/W chunks (NIO.md step 3 applied to its rows) and its k-th chunk
  is global chunk r * D/W + k. When every rank holds n samples and D/W divides n, these are
  exactly the chunks a single process forms from the global batch.
- BatchNorm computes its statistics over each rank's own samples, as BatchNorm does under
  DistributedDataParallel training; the single-process equivalent is a model that forwards
  each rank's block of the global batch on its own. (Statistics over the global batch would
  spread every chunk gradient over all ranks: each rank would then hold a part of all D
  gradients and the exchange below would carry W times more. SyncBatchNorm layers compute
  per-rank statistics too: their synchronised forward has no double backward.)
- A DistributedDataParallel model is run through ``model.module``: DDP's forward broadcasts
  buffers and prepares its reducer for a ``backward()``, neither of which NIO wants (it takes
  gradients with ``torch.autograd.grad``, which fires none of DDP's reduction hooks and
  leaves ``.grad`` alone).

The Gram matrix across ranks, and its bytes
Each rank holds the D/W gradients of its own chunks, m numbers each (all selected tensors).
The parameters are cut into W shards of q = ceil(m / W) numbers. The forward exchange
(``all_to_all_single``) sends rank s the slice of shard s of every local chunk gradient, so
rank s holds shard s of all D gradients ([D, q]); its partial Gram ``X_s X_s^T`` is summed
over ranks with one ``all_reduce`` of D x D numbers. The backward mirrors it: every rank forms
``(dG + dG^T) X_s`` on its shard and the inverse exchange hands each rank the full gradient of
its own chunks. J is a function of G, the same on every rank, so dJ/dtheta on a rank holds its
own chunks' part only; the scale gradients s_p = <dJ/dtheta_p, theta0_p> are linear in it, so
they are summed with one ``all_reduce`` of P numbers (plus W status flags). Every rank then
runs the same Adam step on the same numbers: the scales never drift apart
(``NIO_FAST_DEBUG_DISTRIBUTED=1`` checks it every iteration).

Bytes a rank hands to collectives per NIO iteration (the all-to-all counts the part that
leaves the rank; b: the gradients' element size, g: the Gram's, 4 or 8 for fp64 models):

    2 * (D/W) * ceil(m/W) * (W - 1) * b     the two shard exchanges, about 2 (D/W) m (W-1)/W numbers
    + (D*D + W) * g                         the partial Grams, with W failure flags
    + (P + W) * 8                           the scale gradients (fp64), with W failure flags

A ring all-reduce of one full gradient moves 2 m (W-1)/W numbers per rank, so the exchange
costs D/W such all-reduces: one with one chunk per rank (D = W), two with D = 2W.
``report.distributed`` records the bytes counted; the debug mode adds one all_reduce of
2 (4P + 2) fp64 numbers per iteration. Each call also starts with one all_reduce of 5W fp64
numbers: every rank's argument checks passed, its batch size, a digest of its settings and
parameter list, and checksums of its parameters (they must start equal on every rank).

Failures
Every collective of an iteration up to the scale-gradient sum is known in advance (the
"plan"). A rank that raises there still takes part in the rest of the plan, with zeros and its
failure flag set; at the iteration's one host synchronisation every rank sees the flag and
raises (the failing rank its own exception, the others a ``RankFailure`` naming it), and every
model is restored. A rank that dies or hangs is caught by the process group's timeout: gloo
raises on every waiting rank; NCCL's watchdog ends the processes (``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import zlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - builds without torch.distributed
    dist = None

from .ops.first_order import first_order

DEBUG_ENV = "NIO_FAST_DEBUG_DISTRIBUTED"

GRADCOSINE_PLAN = ("gram_forward", "gram_reduce")
NIO_PLAN = ("gram_forward", "gram_reduce", "gram_backward", "status")


class RankFailure(RuntimeError):
    """Another rank raised; this one stops too."""


def _initialized() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def unwrap(model: Any) -> Any:
    """The module a DistributedDataParallel wraps (the model itself otherwise)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def resolve_group(process_group: Any, model: Any) -> Optional["dist.ProcessGroup"]:
    """The process group a call runs over, or None for a single-process run.

    ``process_group=None``: the DDP wrapper's group, else the default group when
    torch.distributed is initialised, else none. A group of one rank is a single-process run.
    """
    if process_group is None:
        if not _initialized():
            return None
        group = getattr(model, "process_group", None) \
            if isinstance(model, nn.parallel.DistributedDataParallel) else None
        group = group if group is not None else dist.group.WORLD
    else:
        if not _initialized():
            raise ValueError("process_group: given, but torch.distributed is not initialised "
                             "(call torch.distributed.init_process_group first)")
        if process_group is dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError("process_group: this rank is not a member of the group it was given")
        if not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, "
                            f"got {type(process_group).__name__}")
        group = process_group
    if dist.get_rank(group) < 0:
        raise ValueError("process_group: this rank is not a member of the group")
    return group if dist.get_world_size(group) > 1 else None


def is_main_rank(group: Optional["dist.ProcessGroup"]) -> bool:
    """Rank 0 of the group (or a single-process run): the one that shows progress."""
    return group is None or dist.get_rank(group) == 0


def check_chunking(group: Optional["dist.ProcessGroup"], sub_batches: int, overlap: float) -> None:
    """D a multiple of W, no overlap: chunks never span ranks."""
    if group is None:
        return
    world = dist.get_world_size(group)
    if sub_batches % world:
        raise ValueError(f"sub_batches: must be a multiple of the world size {world} in a distributed run "
                         f"(each rank forms sub_batches / world size chunks of its own samples); "
                         f"got {sub_batches}")
    if overlap != 0:
        raise ValueError(f"overlap: must be 0 in a distributed run (chunks never span ranks); got {overlap!r}")


def local_chunks(group: Optional["dist.ProcessGroup"], sub_batches: int) -> int:
    """How many of the D chunks this rank forms."""
    return sub_batches if group is None else sub_batches // dist.get_world_size(group)


def _comm_device(group: "dist.ProcessGroup", device: torch.device) -> torch.device:
    """Where collectives run: the tensors' device, except CUDA tensors on a gloo-only group."""
    if device.type == "cpu" or str(dist.get_backend(group)) != "gloo":
        return device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Before the first collective: every rank checks its arguments, then all compare notes.

class Agreement:
    """What every rank must agree on before a call's first collective, in ONE all_reduce.

    Fixed layout (so that a rank that failed early still sends the same shape): five blocks of
    W numbers, each rank writing its own slot: failed, local batch size, a digest of the
    settings and selected tensors (names, shapes, dtypes), sum and sum of squares of the
    parameters.
    """

    def __init__(self, group: "dist.ProcessGroup"):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.samples = 0
        self.digest = 0
        self.checksums = (0.0, 0.0)
        # a fixed device, so that a rank that failed before seeing the model sends the same tensor
        nccl_only = str(dist.get_backend(group)) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl_only else torch.device("cpu")
        self.sizes: list[int] = []

    def settings(self, settings: dict, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        text = repr((sorted(settings.items()), list(names), [(tuple(p.shape), str(p.dtype)) for p in params]))
        self.digest = zlib.crc32(text.encode())
        with torch.no_grad():
            self.checksums = (float(sum(p.detach().double().sum() for p in params)),
                              float(sum(p.detach().double().square().sum() for p in params)))

    def batch_size(self, samples: int) -> None:
        self.samples = samples

    def exchange(self, failed: bool) -> None:
        table = torch.zeros(5, self.world, dtype=torch.float64)
        if failed:
            table[0, self.rank] = 1
        else:
            table[1:, self.rank] = torch.tensor([self.samples, self.digest, *self.checksums], dtype=torch.float64)
        table = table.to(self.device)
        dist.all_reduce(table, group=self.group)
        table = table.cpu()
        if failed:
            return  # the caller raises its own exception
        failed_ranks = [r for r in range(self.world) if table[0, r] > 0]
        if failed_ranks:
            raise RankFailure(f"nio_fast: rank(s) {failed_ranks} of the process group raised while checking "
                               "their arguments (see the error on that rank); every rank stops")
        digests = table[2].tolist()
        if len(set(digests)) > 1:
            raise ValueError("ranks were called with different settings or parameter lists (names, shapes, "
                             f"dtypes; digests {[int(d) for d in digests]}): every rank must pass the same "
                             "arguments and the same model")
        for row, what in ((3, "sums"), (4, "sums of squares")):
            values = table[row]
            spread = (values.max() - values.min()).abs()
            if spread > 1e-10 * values.abs().max().clamp_min(1e-300):
                raise ValueError(f"the model's parameters differ between ranks (their {what}: {values.tolist()}): "
                                 "build it from the same seed on every rank, or wrap it in "
                                 "DistributedDataParallel, which copies rank 0's parameters to every rank")
        self.sizes = [int(n) for n in table[1].tolist()]


class _NoAgreement:
    """The single-process stand-in: every method does nothing."""

    sizes: list[int] = []

    def settings(self, *args: Any) -> None:
        pass

    def batch_size(self, samples: int) -> None:
        pass


@contextlib.contextmanager
def agreement(group: Optional["dist.ProcessGroup"]) -> Iterator[Any]:
    """Run the argument checks in the block on every rank, then compare notes in one all_reduce.

    A rank whose checks raise still joins the exchange (so no rank waits for it) and then
    raises its own error; the others raise a RuntimeError naming it.
    """
    if group is None:
        yield _NoAgreement()
        return
    notes = Agreement(group)
    try:
        yield notes
    except Exception:
        notes.exchange(failed=True)
        raise
    notes.exchange(failed=False)


# ---------------------------------------------------------------------------------------------
# One distributed run: the sharded Gram, the scale-gradient sum, failure flags, byte counts.

class DistributedRun:
    """The collectives of one ``initialize`` or ``gradcosine`` call on one rank.

    Args:
        group: the process group (W > 1 ranks). params: the selected tensors (P of them,
            m numbers in all). sub_batches: D, a multiple of W. sizes: every rank's batch size
            at the start (for the global chunk ranges ``gradcosine`` reports).
    """

    def __init__(self, group: "dist.ProcessGroup", params: Sequence[torch.Tensor], sub_batches: int,
                 sizes: Sequence[int] = ()):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.num_chunks = sub_batches
        self.local_chunks = sub_batches // self.world
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.numel = sum(self.numels)
        self.shard = max(1, math.ceil(self.numel / self.world))
        self.dtype = functools.reduce(torch.promote_types, (p.dtype for p in params))
        self.gram_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        self.device = params[0].device
        self.comm_device = _comm_device(group, self.device)
        self.sizes = list(sizes)
        self.debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        self.bytes_sent = 0
        self.collective_calls = 0
        self.steps_run = 0
        self.broken = False
        self._plan: Optional[tuple[str, ...]] = None
        self._done = 0
        self._gram_flags: Optional[torch.Tensor] = None
        self._pieces = self._shard_pieces()

    # -- plans and failures ------------------------------------------------------------------

    def nio_step(self) -> contextlib.AbstractContextManager:
        """The block of one NIO iteration, up to its scale-gradient sum."""
        return self.step(NIO_PLAN)

    @contextlib.contextmanager
    def step(self, plan: tuple[str, ...]) -> Iterator[None]:
        """A block whose collectives are ``plan``, in order. If the block raises, this rank runs
        the rest of the plan with zeros and its failure flag, then the exception propagates."""
        self._plan, self._done, self._gram_flags = plan, 0, None
        self.steps_run += 1
        try:
            yield
        except Exception:
            if not self.broken:
                self._complete_after_failure()
            raise
        finally:
            self._plan = None

    def _complete_after_failure(self) -> None:
        plan, done = self._plan or (), self._done
        for name in plan[done:]:
            if name in ("gram_forward", "gram_backward"):
                self._exchange(name, torch.zeros(self.world, self.local_chunks, self.shard, dtype=self.dtype,
                                                 device=self.comm_device))
            elif name == "gram_reduce":
                self._reduce_gram(torch.zeros(self.num_chunks, self.num_chunks, dtype=self.gram_dtype,
                                              device=self.comm_device), failed=True)
            elif name == "status":
                self._status(torch.zeros(len(self.numels), dtype=torch.float64, device=self.comm_device),
                             failed=True)

    def _collective(self, name: str, call, sent_bytes: int) -> None:
        if self._plan is not None:
            expected = self._plan[self._done] if self._done < len(self._plan) else None
            if expected != name:
                self.broken = True
                raise RuntimeError(f"nio_fast internal error: collective {name!r} where the plan has {expected!r}")
            self._done += 1
        try:
            call()
        except Exception:
            self.broken = True  # a collective that failed (a timeout, a lost peer): no more of them
            raise
        self.bytes_sent += sent_bytes
        self.collective_calls += 1

    def _all_reduce(self, name: str, tensor: torch.Tensor, op: Any = None) -> torch.Tensor:
        tensor = tensor.to(self.comm_device).contiguous()
        self._collective(name, lambda: dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=self.group),
                         tensor.numel() * tensor.element_size())
        return tensor

    def _exchange(self, name: str, send: torch.Tensor) -> torch.Tensor:
        """all_to_all of [W, ...]: block s goes to rank s; block r of the result came from rank r."""
        send = send.contiguous()
        received = torch.empty_like(send)
        leaving = send.numel() * send.element_size() * (self.world - 1) // self.world
        self._collective(name, lambda: dist.all_to_all_single(received, send, group=self.group), leaving)
        return received

    # -- the sharded Gram --------------------------------------------------------------------

    def _shard_pieces(self) -> list[tuple[int, int, int, int, int]]:
        """(tensor p, shard s, start, end within p's flat numbers, start within shard s)."""
        pieces, offset, q = [], 0, self.shard
        for p, n in enumerate(self.numels):
            for s in range(offset // q, (offset + n - 1) // q + 1 if n else offset // q):
                start, end = max(offset, s * q), min(offset + n, (s + 1) * q)
                pieces.append((p, s, start - offset, end - offset, start - s * q))
            offset += n
        return pieces

    def _pack(self, layout: Sequence[tuple[int, int]], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """[W, D/W, q]: block s holds shard s of every local chunk gradient (zeros elsewhere)."""
        send = torch.zeros(self.world, self.local_chunks, self.shard, dtype=self.dtype, device=self.comm_device)
        by_tensor: dict[int, list[tuple[int, torch.Tensor]]] = {}
        for (k, p), tensor in zip(layout, tensors):
            by_tensor.setdefault(p, []).append((k, tensor.detach().to(self.comm_device)))
        for p, s, start, end, at in self._pieces:
            for k, tensor in by_tensor.get(p, ()):
                if k < 0:  # stacked: [D/W, ...] for tensor p
                    send[s, :, at:at + end - start].copy_(tensor.reshape(self.local_chunks, -1)[:, start:end])
                else:
                    send[s, k, at:at + end - start].copy_(tensor.reshape(-1)[start:end])
        return send

    def _unpack(self, layout: Sequence[tuple[int, int]], dtypes: Sequence[torch.dtype],
                received: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``_pack``: from [W, D/W, q] back to the input layout."""
        full = [torch.empty(self.local_chunks, n, dtype=self.dtype, device=self.comm_device) for n in self.numels]
        for p, s, start, end, at in self._pieces:
            full[p][:, start:end].copy_(received[s, :, at:at + end - start])
        out = []
        for (k, p), dtype in zip(layout, dtypes):
            value = full[p] if k < 0 else full[p][k]
            shape = (self.local_chunks, *self.shapes[p]) if k < 0 else self.shapes[p]
            out.append(value.reshape(shape).to(device=self.device, dtype=dtype))
        return out

    def _reduce_gram(self, partial: torch.Tensor, failed: bool = False) -> torch.Tensor:
        flags = torch.zeros(self.world, dtype=partial.dtype, device=self.comm_device)
        if failed:
            flags[self.rank] = 1
        total = self._all_reduce("gram_reduce", torch.cat([partial.reshape(-1), flags]))
        self._gram_flags = total[partial.numel():]
        return total[:partial.numel()].view(self.num_chunks, self.num_chunks)

    def gram(self, grads: Any) -> torch.Tensor:
        """The D x D Gram of every rank's chunk gradients, differentiable (once).

        ``grads``: this rank's D/W chunk gradients, as P tensors [D/W, ...] (vmap's layout) or as
        D/W lists of P tensors with None for a tensor the chunk does not reach.
        """
        if isinstance(grads[0], torch.Tensor):
            layout = [(-1, p) for p in range(len(grads))]
            tensors = list(grads)
        else:
            layout = [(k, p) for k, row in enumerate(grads) for p, t in enumerate(row) if t is not None]
            if not layout:
                raise ValueError("params: none of the selected parameters influences the loss")
            tensors = [grads[k][p] for k, p in layout]
        return _ShardedGram.apply(self, layout, *tensors)

    def chunk_ranges(self, local: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Every rank's chunks as ranges of the global batch (when every rank's size is known)."""
        if len(self.sizes) != self.world:
            return list(local)
        from .algorithms.batching import chunk_bounds
        ranges, offset = [], 0
        for size in self.sizes:
            ranges += [(offset + a, offset + b) for a, b in chunk_bounds(size, self.local_chunks, 0.0)]
            offset += size
        return ranges

    # -- the scale gradients and the per-iteration checks ------------------------------------

    def _status(self, scale_grads: torch.Tensor, failed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        flags = torch.zeros(self.world, dtype=torch.float64, device=self.comm_device)
        if failed:
            flags[self.rank] = 1
        scale_grads = scale_grads.to(self.comm_device, torch.float64)
        total = self._all_reduce("status", torch.cat([scale_grads, flags]))
        flags = total[scale_grads.numel():]
        if self._gram_flags is not None:
            flags = flags + self._gram_flags.to(flags.dtype)
        return total[:scale_grads.numel()], flags

    def reduce_scale_gradients(self, scale_grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum this rank's part of s_p over ranks; also returns the [W] failure flags of the step."""
        total, flags = self._status(scale_grads)
        return total.to(scale_grads.device), flags.to(scale_grads.device)

    def raise_if_failed(self, flags: Sequence[float], where: str) -> None:
        failed = [r for r, flag in enumerate(flags) if flag > 0]
        if failed:
            raise RankFailure(f"nio_fast: rank(s) {failed} of {self.world} raised {where} (see the error on that "
                              "rank); every rank stops and restores its model")

    def check_iteration(self, index: int, numbers: list[float], state: torch.Tensor) -> list[float]:
        """After an iteration's host sync: raise if any rank failed (the last W numbers are the
        flags); in debug mode, raise unless every rank holds the same optimizer ``state``.
        Returns ``numbers`` without the flags."""
        self.raise_if_failed(numbers[-self.world:], f"in iteration {index}")
        if self.debug:
            self.check_no_drift(index, state)
        return numbers[:-self.world]

    def check_gradcosine(self) -> None:
        """After ``gradcosine``'s Gram: raise if another rank failed (one host sync)."""
        flags = self._gram_flags.tolist() if self._gram_flags is not None else []
        self.raise_if_failed(flags, "while computing its chunk gradients")

    def _drift_extremes(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = torch.nan_to_num(state.to(self.comm_device, torch.float64), nan=1.2345e300)
        extremes = self._all_reduce("drift", torch.cat([state, -state]), op=dist.ReduceOp.MAX)
        return extremes[:state.numel()], -extremes[state.numel():]

    def check_no_drift(self, index: int, state: torch.Tensor) -> None:
        """Debug mode: raise on every rank unless every rank holds the same scale-optimizer state."""
        highest, lowest = self._drift_extremes(state)
        if not torch.equal(highest, lowest):
            worst = float((highest - lowest).abs().max())
            raise RuntimeError(f"nio_fast: ranks drifted apart at iteration {index}: the scale optimizer's state "
                               f"differs between ranks by up to {worst:.3g}")

    def agree_on_seconds(self, seconds: float) -> float:
        """The slowest rank's wall time, so that every rank reports the same number."""
        return float(self._all_reduce("seconds", torch.tensor([seconds], dtype=torch.float64),
                                      op=dist.ReduceOp.MAX)[0])

    def summary(self) -> dict[str, Any]:
        """What the report records about the communication (the same on every rank)."""
        return {"world_size": self.world, "backend": str(dist.get_backend(self.group)),
                "bytes_sent": self.bytes_sent, "collective_calls": self.collective_calls,
                "bytes_per_iteration": self.bytes_sent / self.steps_run if self.steps_run else None,
                "gradient_numel": self.numel}


class _ShardedGram(torch.autograd.Function):
    """G = X X^T over the ranks' chunk gradients X ([D, m], rows spread over ranks), by shards."""

    @staticmethod
    def forward(ctx, run: DistributedRun, layout, *tensors: torch.Tensor) -> torch.Tensor:
        shard = run._exchange("gram_forward", run._pack(layout, tensors))
        shard = shard.reshape(run.num_chunks, run.shard)  # row r * D/W + k: chunk k of rank r
        wide = shard.to(run.gram_dtype)
        gram = run._reduce_gram(wide @ wide.T)
        ctx.run, ctx.layout = run, layout
        ctx.dtypes = [t.dtype for t in tensors]
        ctx.save_for_backward(shard)
        return gram.to(run.device)

    @staticmethod
    @first_order
    def backward(ctx, grad_gram: torch.Tensor):
        (shard,) = ctx.saved_tensors
        run = ctx.run
        weights = (grad_gram + grad_gram.T).to(run.comm_device, run.gram_dtype)
        partial = (weights @ shard.to(run.gram_dtype)).to(run.dtype)
        mine = run._exchange("gram_backward", partial.reshape(run.world, run.local_chunks, run.shard))
        return (None, None) + tuple(run._unpack(ctx.layout, ctx.dtypes, mine))
