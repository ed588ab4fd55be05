"""Triton kernels for the Gram matrix of D gradients and its backward, without concatenation.

Each gradient is a list of P tensors. Per dtype group, a work table (see ``work_table``) lists
chunks of parameters and the D addresses of each parameter; a persistent grid of programs walks
the rows with a grid stride. For each tile of BLOCK consecutive elements of a chunk, a program
reads the same elements of all D gradients (one base pointer per gradient) and

* forward: accumulates ``X @ X^T`` ([DPAD, BLOCK] tile) in registers and finally writes its
  [D, D] partial Gram into a small buffer [programs, D, D], summed by torch afterwards
  (deterministic, no float atomics);
* backward: computes ``Y = S @ X`` (X read in chunks of 16 gradients) and writes it to the
  outputs, which share the inputs' storage order.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from .work_table import GramInputs, PreparedGroup, pack_tables, prepare_gram_groups, same_storage_order

__all__ = ["gram_backward", "gram_forward"]

# Elements of one [DPAD, BLOCK] tile, BLOCK = elements // DPAD (64-bit data: half, as each element
# takes two registers). Large tiles give long contiguous row reads (BLOCK * element size bytes per
# gradient) and a deep tl.dot K; the limit is registers: with 8 warps these are the largest
# powers of two that ptxas compiles for sm_90 without spilling for every dtype at DPAD 16..64
# (forward at DPAD 64, fp64: 8 bytes of stack). The backward keeps a [DPAD, BLOCK] fp32 result
# tile plus its pipelined input chunks live, hence half the forward's tile.
_FORWARD_TILE_ELEMENTS = 8192
_BACKWARD_TILE_ELEMENTS = 4096
_NUM_WARPS = 8
# A work-table row is TABLE_BLOCK elements of one parameter (a multiple of every BLOCK): big enough
# to keep the table small (100M elements -> ~24K rows, ~0.6 MB) and the per-row overhead (two
# table loads and D address loads) negligible, small enough to balance the grid on large models.
TABLE_BLOCK = 4096
# Persistent grid size on GPU: a few programs per SM hide latency; more would only enlarge the
# partial-Gram buffer. Under the CPU interpreter programs run one after the other, so a handful
# suffices (still several, to exercise the grid-stride loop and the partial sums).
_PROGRAMS_PER_SM = 4
_INTERPRETER_PROGRAMS = 3
# Vector loads need 16-byte aligned bases; checked on the host per group.
_VECTOR_BYTES = 16

_TORCH_TO_TRITON = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _load_row(rows_ptr, row):
    """One work row: (local tensor index, first element offset, element count)."""
    tensor_index = tl.load(rows_ptr + row * 3)
    first = tl.load(rows_ptr + row * 3 + 1)
    count = tl.load(rows_ptr + row * 3 + 2)
    return tensor_index, first, count


@triton.jit
def _element_offset(address, anchor_address, ELEMENT_SIZE: tl.constexpr, ALIGNED: tl.constexpr):
    """Byte address -> element offset from the anchor pointer.

    Pointers are formed as ``anchor_ptr + offset`` rather than by casting the address to a pointer:
    Triton's alignment analysis does not see through int-to-pointer casts, and without it no load
    or store is vectorized. Addresses of one dtype differ by whole elements, so the division is exact.
    """
    offset = (address - anchor_address) // ELEMENT_SIZE
    if ALIGNED:
        offset = tl.multiple_of(offset, 16 // ELEMENT_SIZE)
    return offset


@triton.jit
def _gram_forward_kernel(
    addresses_ptr,  # int64 [P_g, D]
    rows_ptr,  # int64 [R, 3]
    partials_ptr,  # ACC_DTYPE [num_programs, D, D]
    anchor_ptr,  # any tensor of the group's dtype; all accesses are relative to it
    anchor_address,  # its data_ptr()
    num_rows,
    D,
    DOT_DTYPE: tl.constexpr,  # operand type of tl.dot (see _dot_dtype)
    ACC_DTYPE: tl.constexpr,
    DPAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address 16-byte aligned: enables vector loads
):
    ELEMENT_SIZE: tl.constexpr = anchor_ptr.dtype.element_ty.primitive_bitwidth // 8
    program = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0).to(tl.int64)
    gradient = tl.arange(0, DPAD)
    gradient_valid = gradient < D
    lane = tl.arange(0, BLOCK).to(tl.int64)
    acc = tl.zeros([DPAD, DPAD], dtype=ACC_DTYPE)
    for row in range(program, num_rows, num_programs):
        tensor_index, first, count = _load_row(rows_ptr, row)
        addresses = tl.load(addresses_ptr + tensor_index * D + gradient, mask=gradient_valid, other=anchor_address)
        pointers = anchor_ptr + _element_offset(addresses, anchor_address, ELEMENT_SIZE, ALIGNED)[:, None]
        # Full tiles: the mask depends on the gradient only, so loads can be vectorized.
        num_full_tiles = count // BLOCK
        for tile in range(0, num_full_tiles):
            start = first + tile * BLOCK
            if ALIGNED:
                start = tl.multiple_of(start, BLOCK)  # rows start at multiples of TABLE_BLOCK
            x = tl.load(pointers + (start + lane)[None, :], mask=gradient_valid[:, None], other=0.0)
            x = x.to(DOT_DTYPE)
            acc = tl.dot(x, tl.trans(x), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        tail = count - num_full_tiles * BLOCK
        if tail > 0:
            start = first + num_full_tiles * BLOCK
            mask = gradient_valid[:, None] & (lane < tail)[None, :]
            x = tl.load(pointers + (start + lane)[None, :], mask=mask, other=0.0)
            x = x.to(DOT_DTYPE)
            acc = tl.dot(x, tl.trans(x), acc, input_precision="ieee", out_dtype=ACC_DTYPE)
    out_mask = gradient_valid[:, None] & gradient_valid[None, :]
    out_offsets = program * D * D + gradient[:, None] * D + gradient[None, :]
    tl.store(partials_ptr + out_offsets, acc, mask=out_mask)


@triton.jit
def _backward_tile(
    input_addresses_ptr, tensor_index, anchor_ptr, anchor_address, output_pointers, s_ptr, D, start, tail,
    gradient, gradient_valid, MATH_DTYPE: tl.constexpr, DPAD: tl.constexpr, BLOCK: tl.constexpr,
    ELEMENT_SIZE: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr,
):
    """Y = S @ X for one tile (FULL: all BLOCK lanes, else the first ``tail``), stored to the outputs.

    The product runs over the D inputs in chunks of 16: an fp32 (no TF32) or fp64 tl.dot keeps
    its operands whole in registers, and with K = DPAD = 64 that spills; with K = 16 it does not,
    and each chunk is still one vectorized 2D load that the compiler can pipeline.
    """
    lane = tl.arange(0, BLOCK).to(tl.int64)
    y = tl.zeros([DPAD, BLOCK], dtype=MATH_DTYPE)
    for chunk in tl.static_range(0, DPAD, 16):
        source = chunk + tl.arange(0, 16)
        source_valid = source < D
        addresses = tl.load(input_addresses_ptr + tensor_index * D + source, mask=source_valid, other=anchor_address)
        pointers = anchor_ptr + _element_offset(addresses, anchor_address, ELEMENT_SIZE, ALIGNED)[:, None]
        if FULL:
            x = tl.load(pointers + (start + lane)[None, :], mask=source_valid[:, None], other=0.0)
        else:
            x = tl.load(pointers + (start + lane)[None, :], mask=source_valid[:, None] & (lane < tail)[None, :],
                        other=0.0)
        s_mask = gradient_valid[:, None] & source_valid[None, :]
        s = tl.load(s_ptr + gradient[:, None] * D + source[None, :], mask=s_mask, other=0.0)
        y = tl.dot(s, x.to(MATH_DTYPE), y, input_precision="ieee", out_dtype=MATH_DTYPE)
    y = y.to(anchor_ptr.dtype.element_ty)
    if FULL:
        tl.store(output_pointers + (start + lane)[None, :], y, mask=gradient_valid[:, None])
    else:
        tl.store(output_pointers + (start + lane)[None, :], y, mask=gradient_valid[:, None] & (lane < tail)[None, :])


@triton.jit
def _gram_backward_kernel(
    input_addresses_ptr,  # int64 [P_g, D]
    output_addresses_ptr,  # int64 [P_g, D], same storage order as the inputs
    rows_ptr,  # int64 [R, 3]
    s_ptr,  # MATH_DTYPE [D, D], contiguous
    anchor_ptr,  # any tensor of the group's dtype; all accesses are relative to it
    anchor_address,  # its data_ptr()
    num_rows,
    D,
    MATH_DTYPE: tl.constexpr,
    DPAD: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    ELEMENT_SIZE: tl.constexpr = anchor_ptr.dtype.element_ty.primitive_bitwidth // 8
    program = tl.program_id(0).to(tl.int64)
    num_programs = tl.num_programs(0).to(tl.int64)
    gradient = tl.arange(0, DPAD)
    gradient_valid = gradient < D
    for row in range(program, num_rows, num_programs):
        tensor_index, first, count = _load_row(rows_ptr, row)
        output_addresses = tl.load(
            output_addresses_ptr + tensor_index * D + gradient, mask=gradient_valid, other=anchor_address
        )
        output_pointers = anchor_ptr + _element_offset(output_addresses, anchor_address, ELEMENT_SIZE, ALIGNED)[:, None]
        num_full_tiles = count // BLOCK
        for tile in range(0, num_full_tiles):
            start = first + tile * BLOCK
            if ALIGNED:
                start = tl.multiple_of(start, BLOCK)
            _backward_tile(input_addresses_ptr, tensor_index, anchor_ptr, anchor_address, output_pointers, s_ptr, D,
                           start, BLOCK, gradient, gradient_valid, MATH_DTYPE, DPAD, BLOCK, ELEMENT_SIZE, ALIGNED,
                           FULL=True)
        tail = count - num_full_tiles * BLOCK
        if tail > 0:
            _backward_tile(input_addresses_ptr, tensor_index, anchor_ptr, anchor_address, output_pointers, s_ptr, D,
                           first + num_full_tiles * BLOCK, tail, gradient, gradient_valid, MATH_DTYPE, DPAD, BLOCK,
                           ELEMENT_SIZE, ALIGNED, FULL=False)


def _padded_gradient_count(num_gradients: int) -> int:
    """Next power of two >= max(D, 16): tl.dot needs power-of-two tiles of at least 16 rows."""
    return max(16, triton.next_power_of_2(num_gradients))


def _block_size(tile_elements: int, padded_gradients: int, dtype: torch.dtype) -> int:
    """Tile width BLOCK for a kernel whose tile budget (32-bit elements) is ``tile_elements``."""
    if dtype == torch.float64:
        tile_elements //= 2
    block = max(16, tile_elements // padded_gradients)
    assert TABLE_BLOCK % block == 0, "tiles must not straddle work rows"
    return block


def _interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of the forward tl.dot.

    16-bit inputs stay 16-bit on GPU: their products are exact in fp32 and tensor cores accumulate
    in fp32, which is the same math as upcasting first, at tensor-core speed. The interpreter
    multiplies bf16 as raw integers (numpy has no bf16), so there bf16 is upcast first.
    """
    if dtype == torch.bfloat16 and _interpreting():
        return tl.float32
    return _TORCH_TO_TRITON[dtype]


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_programs(num_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capacity = _PROGRAMS_PER_SM * _multiprocessor_count(index)
    else:
        capacity = _INTERPRETER_PROGRAMS
    return max(1, min(num_rows, capacity))


def _check_runnable(device: torch.device) -> None:
    # The kernels dereference raw addresses: under the interpreter they must be host memory, on a
    # GPU device memory.
    if _interpreting() and device.type != "cpu":
        raise RuntimeError(f"under TRITON_INTERPRET the Gram kernels take CPU tensors, got {device}")
    if not _interpreting() and device.type != "cuda":
        raise RuntimeError(f"Triton Gram kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _all_aligned(tables: Sequence[Sequence[Sequence[torch.Tensor]]]) -> bool:
    return all(t.data_ptr() % _VECTOR_BYTES == 0 for table in tables for column in table for t in column)


def gram_forward(grads: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """Gram matrix ``G[i, j] = sum_p <grads[i][p], grads[j][p]>`` of D gradients.

    ``grads[d][p]``: for each ``p`` all D tensors share shape and dtype (fp16, bf16, fp32 or fp64);
    parameters may differ in dtype. Returns a [D, D] float32 tensor accumulated in fp32, or float64
    accumulated in fp64 when any input is float64. One launch per dtype group; deterministic.
    """
    inputs = prepare_gram_groups(grads)
    num_gradients = inputs.num_gradients
    gram = torch.zeros(num_gradients, num_gradients, dtype=inputs.result_dtype, device=inputs.device)
    for group in inputs.groups:
        gram += _group_gram(inputs, group).to(gram.dtype)
    return gram


def _group_gram(inputs: GramInputs, group: PreparedGroup) -> torch.Tensor:
    device = inputs.device
    _check_runnable(device)
    num_gradients = inputs.num_gradients
    numels = [tensor.numel() for tensor in group.walk_inputs[0]]
    (addresses,), rows = pack_tables([group.walk_inputs], numels, TABLE_BLOCK, device)
    num_rows = rows.shape[0]
    acc_dtype = torch.float64 if group.dtype == torch.float64 else torch.float32
    padded = _padded_gradient_count(num_gradients)
    num_programs = _num_programs(num_rows, device)
    partials = torch.empty(num_programs, num_gradients, num_gradients, dtype=acc_dtype, device=device)
    anchor = group.walk_inputs[0][0]
    _gram_forward_kernel[(num_programs,)](
        addresses,
        rows,
        partials,
        anchor,
        anchor.data_ptr(),
        num_rows,
        num_gradients,
        DOT_DTYPE=_dot_dtype(group.dtype),
        ACC_DTYPE=_TORCH_TO_TRITON[acc_dtype],
        DPAD=padded,
        BLOCK=_block_size(_FORWARD_TILE_ELEMENTS, padded, group.dtype),
        ALIGNED=_all_aligned([group.walk_inputs]),
        num_warps=_NUM_WARPS,
    )
    return partials.sum(dim=0)


def gram_backward(grads: Sequence[Sequence[torch.Tensor]], S: torch.Tensor) -> list[list[torch.Tensor]]:
    """``out[d][p] = sum_j S[d, j] * grads[j][p]``, the backward of :func:`gram_forward` given S.

    Math is fp32 (fp64 for fp64 inputs). ``out[d][p]`` has the shape, dtype and device of
    ``grads[d][p]`` and the strides of ``torch.empty_like(grads[d][p])``: the input's own strides
    whenever it is dense (contiguous or permuted); torch's choice for inputs with gaps or broadcast
    strides, whose layout cannot be reproduced by a fresh tensor.
    """
    inputs = prepare_gram_groups(grads)
    num_gradients = inputs.num_gradients
    if tuple(S.shape) != (num_gradients, num_gradients):
        raise ValueError(f"S must be [{num_gradients}, {num_gradients}], got {tuple(S.shape)}")
    outputs = [[torch.empty_like(tensor) for tensor in gradient] for gradient in grads]
    for group in inputs.groups:
        _group_backward(inputs, group, S, outputs)
    return outputs


def _group_backward(
    inputs: GramInputs, group: PreparedGroup, S: torch.Tensor, outputs: list[list[torch.Tensor]]
) -> None:
    device = inputs.device
    _check_runnable(device)
    num_gradients = inputs.num_gradients
    # The kernel writes in the inputs' walk order. Final outputs with that order are written in
    # place; the others (rare path) get a walk-ordered buffer copied over afterwards.
    targets: list[list[torch.Tensor]] = [[] for _ in range(num_gradients)]
    copies_back: list[tuple[torch.Tensor, torch.Tensor]] = []
    for d in range(num_gradients):
        for walk_input, p in zip(group.walk_inputs[d], group.param_indices):
            final = outputs[d][p]
            if same_storage_order(walk_input, final):
                targets[d].append(final)
            else:
                buffer = torch.empty_like(walk_input)
                targets[d].append(buffer)
                copies_back.append((final, buffer))

    numels = [tensor.numel() for tensor in group.walk_inputs[0]]
    (input_addresses, output_addresses), rows = pack_tables(
        [group.walk_inputs, targets], numels, TABLE_BLOCK, device
    )
    num_rows = rows.shape[0]
    math_dtype = torch.float64 if group.dtype == torch.float64 else torch.float32
    s_math = S.detach().to(device=device, dtype=math_dtype).contiguous()
    padded = _padded_gradient_count(num_gradients)
    anchor = group.walk_inputs[0][0]
    _gram_backward_kernel[(_num_programs(num_rows, device),)](
        input_addresses,
        output_addresses,
        rows,
        s_math,
        anchor,
        anchor.data_ptr(),
        num_rows,
        num_gradients,
        MATH_DTYPE=_TORCH_TO_TRITON[math_dtype],
        DPAD=padded,
        BLOCK=_block_size(_BACKWARD_TILE_ELEMENTS, padded, group.dtype),
        ALIGNED=_all_aligned([group.walk_inputs, targets]),
        num_warps=_NUM_WARPS,
    )
    for final, buffer in copies_back:
        final.copy_(buffer)
