"""Work tables for the Gram kernels, and the input preparation that makes tensors walkable.

A kernel never sees the gradients as tensors: it gets, per dtype group, two int64 tables

* ``addresses`` [P_g, D]: byte address of the first element, in storage order, of ``grads[d][p]``;
* ``rows`` [R, 3]: ``(local tensor index, first element offset, element count)``; each tensor's
  elements are covered, in order, by chunks of ``block`` elements (the last chunk may be shorter);
  0-element tensors give no rows.

Element ``e`` of a row is then the element at ``addresses[p, d] + (offset + e) * element_size``.
This is only valid when every tensor of a parameter is *walkable* (dense, non-overlapping) and all
``grads[.][p]`` enumerate their elements in the same storage order; :func:`prepare_gram_groups`
guarantees both, copying only the tensors that need it.

The C++ extension has a twin of :func:`build_work_table`; tests hold the two equal, so the format
above is a contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "GramInputs",
    "PreparedGroup",
    "build_work_table",
    "is_storage_walkable",
    "pack_tables",
    "prepare_gram_groups",
    "same_storage_order",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_storage_walkable(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` covers exactly ``numel`` consecutive elements of its storage.

    That is the dense, non-overlapping case (contiguous or any permutation of it, e.g. a
    transpose): a sum over its elements can then read storage linearly from ``data_ptr()``.
    """
    if tensor.is_contiguous():
        return True
    # Size-1 dimensions never move the address, so their strides are irrelevant.
    sized_dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride()) if size != 1)
    expected_stride = 1
    for stride, size in sized_dims:
        if stride != expected_stride:
            return False
        expected_stride *= size
    return True


def same_storage_order(first: torch.Tensor, second: torch.Tensor) -> bool:
    """True when two equally shaped walkable tensors list their elements in the same storage order."""
    if first.stride() == second.stride():
        return True
    return all(a == b for size, a, b in zip(first.shape, first.stride(), second.stride()) if size != 1)


@dataclass
class PreparedGroup:
    """The parameters of one dtype, ready for :func:`build_work_table`.

    ``walk_inputs[d][k]`` is the walkable stand-in for ``grads[d][param_indices[k]]``: the tensor
    itself on the fast path, a contiguous copy otherwise. Only non-empty parameters are kept.
    """

    dtype: torch.dtype
    param_indices: list[int] = field(default_factory=list)
    walk_inputs: list[list[torch.Tensor]] = field(default_factory=list)


@dataclass
class GramInputs:
    """Validated gradients split into dtype groups (see :func:`prepare_gram_groups`)."""

    num_gradients: int
    num_params: int
    device: torch.device
    groups: list[PreparedGroup]
    result_dtype: torch.dtype  # float64 when any tensor (empty ones included) is float64, else float32


def prepare_gram_groups(grads: Sequence[Sequence[torch.Tensor]]) -> GramInputs:
    """Validate ``grads[d][p]`` and group its non-empty parameters by dtype, in first-seen order.

    A parameter is used in place when its first tensor is walkable and every other ``grads[d][p]``
    has the same storage order (the usual case: gradients of one parameter share its layout).
    Otherwise (gaps, broadcast strides, layouts differing across ``d``) every tensor of that
    parameter is walked through a contiguous copy; ``.contiguous()`` returns the tensor itself when
    it already is contiguous.
    """
    num_gradients = len(grads)
    if num_gradients == 0:
        raise ValueError("need at least one gradient")
    num_params = len(grads[0])
    for d, gradient in enumerate(grads):
        if len(gradient) != num_params:
            raise ValueError(f"gradient {d} has {len(gradient)} tensors, gradient 0 has {num_params}")

    device = grads[0][0].device if num_params else torch.device("cpu")
    groups: dict[torch.dtype, PreparedGroup] = {}
    result_dtype = torch.float32
    for p in range(num_params):
        reference = grads[0][p]
        if reference.dtype == torch.float64:
            result_dtype = torch.float64
        if reference.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {p}: unsupported dtype {reference.dtype}")
        if reference.device != device:
            raise ValueError(f"parameter {p} is on {reference.device}, parameter 0 on {device}")
        shape, dtype, stride = reference.shape, reference.dtype, reference.stride()
        column = [grads[d][p] for d in range(num_gradients)]
        same_order = True
        for d, tensor in enumerate(column):
            if tensor.dtype != dtype or tensor.shape != shape or tensor.device != device:
                raise ValueError(
                    f"grads[{d}][{p}] is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}, "
                    f"grads[0][{p}] is {tuple(shape)} {dtype} on {device}"
                )
            if same_order and tensor.stride() != stride:
                same_order = same_storage_order(reference, tensor)
        if reference.numel() == 0:
            continue
        if not (same_order and is_storage_walkable(reference)):
            column = [tensor.contiguous() for tensor in column]

        group = groups.get(reference.dtype)
        if group is None:
            group = groups[reference.dtype] = PreparedGroup(
                reference.dtype, walk_inputs=[[] for _ in range(num_gradients)]
            )
        group.param_indices.append(p)
        for d, tensor in enumerate(column):
            group.walk_inputs[d].append(tensor)
    return GramInputs(num_gradients, num_params, device, list(groups.values()), result_dtype)


def _host_rows(numels: Sequence[int], block: int) -> torch.Tensor:
    """The ``rows`` table [R, 3] on the CPU (see module docstring)."""
    numel = torch.tensor(list(numels), dtype=torch.int64)
    chunks = (numel + block - 1) // block
    tensor_index = torch.repeat_interleave(torch.arange(len(numel), dtype=torch.int64), chunks)
    first_chunk_of_tensor = torch.cumsum(chunks, 0) - chunks
    num_rows = tensor_index.numel()
    chunk_in_tensor = torch.arange(num_rows, dtype=torch.int64) - first_chunk_of_tensor[tensor_index]
    offset = chunk_in_tensor * block
    count = torch.clamp(numel[tensor_index] - offset, max=block)
    return torch.stack([tensor_index, offset, count], dim=1)


def pack_tables(
    address_tables: Sequence[Sequence[Sequence[torch.Tensor]]],
    numels: Sequence[int],
    block: int,
    device: torch.device,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Build several ``addresses`` tables sharing one ``rows`` table with a single host-to-device copy.

    ``address_tables[i][d][p]`` (D lists of P tensors each) share one walk, e.g. the inputs and the
    outputs of the backward; ``numels[p]`` is the element count of parameter ``p``. Returns the
    address tables [P, D] and the rows [R, 3], all views of one int64 buffer on ``device``.
    """
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    rows = _host_rows(numels, block)
    num_params = len(numels)
    num_gradients = len(address_tables[0]) if address_tables else 0
    # Gathered gradient-major (plain list iteration, the cheap order in Python), then transposed to
    # the [P, D] layout, where one kernel row reads its D addresses from consecutive memory.
    flat_addresses = [tensor.data_ptr() for table in address_tables for column in table for tensor in column]
    addresses = torch.tensor(flat_addresses, dtype=torch.int64).view(len(address_tables), num_gradients, num_params)
    host = torch.cat([addresses.transpose(1, 2).reshape(-1), rows.reshape(-1)])
    if device.type == "cuda":
        # Pinned + non_blocking: the copy queues on the stream instead of stalling the host.
        device_buffer = host.pin_memory().to(device, non_blocking=True)
    else:
        device_buffer = host.to(device)
    table_size = num_params * num_gradients
    tables = [
        device_buffer[i * table_size : (i + 1) * table_size].view(num_params, num_gradients)
        for i in range(len(address_tables))
    ]
    return tables, device_buffer[len(address_tables) * table_size :].view(-1, 3)


def build_work_table(grads_group: Sequence[Sequence[torch.Tensor]], block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Build ``(addresses [P_g, D], rows [R, 3])`` for ``grads_group[d][p]`` (see module docstring).

    The tensors must already be walkable with a common storage order per parameter (the output of
    :func:`prepare_gram_groups`); they are not checked here, as this runs every iteration.
    Addresses are ``data_ptr()`` (for walkable tensors, which have non-negative strides, the element
    at index 0 is the lowest address), also for 0-element tensors, which get no rows.
    Both tables are int64 on the tensors' device (CPU when there are none), moved there in one copy.
    """
    num_params = len(grads_group[0]) if len(grads_group) else 0
    device = grads_group[0][0].device if num_params else torch.device("cpu")
    numels = [grads_group[0][p].numel() for p in range(num_params)]
    (addresses,), rows = pack_tables([grads_group], numels, block, device)
    return addresses, rows
