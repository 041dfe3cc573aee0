"""Sparse weights as compressed tensors: the bitmask and packed 2:4 layouts of compressed-tensors.

Pure tensor functions, no files and no model: ``compress_bitmask`` / ``compress_24`` turn one
weight into a dict of tensors, ``decompress`` turns such a dict back into the weight, bit for bit.

The layouts are those compressed-tensors (the format llm-compressor writes) used for its
``sparse-bitmask`` and ``sparse-24-bitmask`` formats, so checkpoints written by those tools load:

``sparse-bitmask`` (any sparsity), for a weight of shape (R, C) in dtype D:
  - ``compressed``  (nnz,) D: the stored values, row by row, left to right
  - ``bitmask``     (R, ceil(C/8)) uint8: bit ``j % 8`` (least significant first) of byte ``j // 8``
    in row ``r`` is set when entry (r, j) is stored; the padding bits of a row's last byte are 0
    (numpy's ``packbits(mask, axis=-1, bitorder="little")``)
  - ``row_offsets`` (R,) int64: where each row starts in ``compressed`` (exclusive prefix sum of the
    rows' set bits; redundant, checked on reading)
  - ``shape``       (2,) int64: (R, C)
``sparse-24-bitmask`` (every group of 4 consecutive entries of a row stores exactly 2):
  - ``compressed``  (R, C/2) D: each row's two stored values per group, left to right
  - ``bitmask``     (R, ceil(C/8)) uint8, as above, exactly 2 bits set per group of 4
  - ``shape``       (2, 1) int64: (R, C)

compressed-tensors stores an entry when its value ``!= 0``; here an entry is stored when any bit
of it is set, so ``-0.0`` (and a NaN payload) survive the round trip exactly; readers of either
kind decode both, since the mask alone says where the values go. A 2:4 group with fewer than 2
non-zero entries stores zeros to fill its 2 slots, as compressed-tensors does.

Older compressed-tensors versions compressed 1-D tensors too (shape (C,), bitmask (ceil(C/8),),
a 0-d row offset): ``decompress`` reads those as one row.
"""

from __future__ import annotations

import math

import torch

from .errors import ModelError

BITMASK = "sparse-bitmask"
PACKED_24 = "sparse-24-bitmask"
FORMATS = (BITMASK, PACKED_24)
#: the tensors of each layout, as suffixes of the weight's name
PARTS = {BITMASK: ("compressed", "bitmask", "row_offsets", "shape"), PACKED_24: ("compressed", "bitmask", "shape")}

_BIT_VALUES = 1 << torch.arange(8, dtype=torch.int32)  # bit j of a byte has value 2**j: little bit order


class CompressedTensorError(ModelError):
    """A compressed tensor's parts disagree (truncated values, a wrong mask or shape); the message names
    the fault only: the loader adds the file and tensor."""


# ---------------------------------------------------------------- masks


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def stored_entries(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask of the entries with any bit set (a plain ``!= 0`` would drop ``-0.0``)."""
    if weight.dtype == torch.bool:
        return weight.clone()
    same_size_int = _INT_OF_SIZE.get(weight.element_size())
    if same_size_int is not None:  # one comparison of the raw bits (3-4x faster than per-byte any())
        return weight.contiguous().view(same_size_int).ne(0)
    raw = weight.contiguous().view(torch.uint8).reshape(*weight.shape, weight.element_size())
    return raw.ne(0).any(-1)


def count(mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Set entries of a bool mask (over ``dim``, or all), as int64: summing its bytes is ~5x faster than a bool sum."""
    as_bytes = mask.view(torch.uint8)
    return as_bytes.sum(dtype=torch.int64) if dim is None else as_bytes.sum(dim, dtype=torch.int64)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(..., C) bool -> (..., ceil(C/8)) uint8, least significant bit first, zero padding bits."""
    columns = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-columns) % 8))
    groups = padded.reshape(*mask.shape[:-1], -1, 8)
    bits = groups.to(torch.uint8)
    packed = bits[..., 0].clone()
    for j in range(1, 8):  # OR of shifted bits: ~5x faster than a weighted sum over the last dim of 8
        packed |= bits[..., j] << j
    return packed


def unpack_mask(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """(..., ceil(C/8)) uint8 (or int8, the same bytes) -> (..., C) bool."""
    if packed.dtype == torch.int8:
        packed = packed.view(torch.uint8)
    bits = packed.to(torch.int32).unsqueeze(-1).bitwise_and(_BIT_VALUES).ne(0)
    return bits.reshape(*packed.shape[:-1], -1)[..., :columns]


# ---------------------------------------------------------------- compress


def compress_bitmask(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sparse-bitmask tensors of a 2-D ``weight``."""
    _check_matrix(weight)
    mask = stored_entries(weight)
    counts = count(mask, -1)
    return {"compressed": torch.masked_select(weight, mask), "bitmask": pack_mask(mask),
            "row_offsets": (counts.cumsum(0) - counts).to(torch.int64),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def packs_24(weight: torch.Tensor) -> bool:
    """True if ``weight`` (2-D, columns a multiple of 4) has at most 2 stored entries in every group of 4."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(count(stored_entries(weight).reshape(weight.shape[0], -1, 4), -1).le(2).all())


def compress_24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sparse-24-bitmask tensors of a 2-D ``weight`` that ``packs_24``."""
    _check_matrix(weight)
    if not packs_24(weight):
        raise ValueError(f"a weight of shape {tuple(weight.shape)} with more than 2 non-zeros in some group of 4 "
                         "(or columns not a multiple of 4) has no packed 2:4 form: use compress_bitmask")
    rows, columns = weight.shape
    mask = stored_entries(weight).reshape(rows, -1, 4)
    # a group with fewer than 2 stored entries also stores its first zeros, so that every group fills 2 slots
    empty = ~mask
    missing = 2 - count(mask, -1).unsqueeze(-1)
    mask = mask | (empty & (empty.cumsum(-1) <= missing))
    mask = mask.reshape(rows, columns)
    return {"compressed": torch.masked_select(weight, mask).reshape(rows, columns // 2), "bitmask": pack_mask(mask),
            "shape": torch.tensor(list(weight.shape), dtype=torch.int64).reshape(-1, 1)}


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"only 2-D weights are compressed; this one has shape {tuple(weight.shape)}")


# ---------------------------------------------------------------- decompress


def decompress(parts: dict[str, torch.Tensor], layout: str) -> torch.Tensor:
    """The dense weight of the tensors ``compress_bitmask`` / ``compress_24`` (or compressed-tensors) wrote.

    Every inconsistency is a ``CompressedTensorError``: a missing part, a mask whose set bits disagree
    with the number of values, a mask or value shape that does not fit ``shape``, wrong row offsets.
    """
    if layout not in PARTS:
        raise ValueError(f"unknown layout {layout!r}: choose from {', '.join(PARTS)}")
    missing = [p for p in PARTS[layout] if p not in parts]
    if missing:
        raise CompressedTensorError(f"{layout} needs {', '.join(PARTS[layout])}; "
                                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")
    shape = _shape(parts["shape"])
    values, packed = parts["compressed"], parts["bitmask"]
    leading, columns = shape[:-1], shape[-1]
    if packed.dtype not in (torch.uint8, torch.int8) or tuple(packed.shape) != (*leading, math.ceil(columns / 8)):
        raise CompressedTensorError(f"its bitmask is {tuple(packed.shape)} {_dtype(packed)}; a weight of shape "
                                    f"{tuple(shape)} needs {(*leading, math.ceil(columns / 8))} uint8")
    mask = unpack_mask(packed, columns)
    row_counts = count(mask.reshape(-1, mask.shape[-1]), -1)
    stored = int(row_counts.sum())
    if stored != values.numel():
        raise CompressedTensorError(f"its bitmask has {stored} set bits but {values.numel()} values are stored "
                                    "(the values are truncated or the mask is wrong)")
    if layout == PACKED_24:
        _check_24(values, mask, shape)
    else:
        if values.dim() != 1:
            raise CompressedTensorError(f"its values have shape {tuple(values.shape)}; the bitmask layout stores them flat")
        _check_row_offsets(parts["row_offsets"], row_counts)
    return torch.zeros(shape, dtype=values.dtype).masked_scatter_(mask, values.reshape(-1))


def _shape(tensor: torch.Tensor) -> list[int]:
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise CompressedTensorError(f"its shape tensor is {_dtype(tensor)}, not integers")
    shape = [int(v) for v in tensor.reshape(-1).tolist()]
    if not 1 <= len(shape) <= 2 or any(v < 0 for v in shape):
        raise CompressedTensorError(f"its shape {shape} is not the shape of a 1-D or 2-D weight")
    return shape


def _check_24(values: torch.Tensor, mask: torch.Tensor, shape: list[int]) -> None:
    if len(shape) != 2 or shape[1] % 4:
        raise CompressedTensorError(f"its shape {shape} has no 2:4 layout (2-D, columns a multiple of 4)")
    if tuple(values.shape) != (shape[0], shape[1] // 2):
        raise CompressedTensorError(f"its values have shape {tuple(values.shape)}; the 2:4 layout of {shape} "
                                    f"stores {(shape[0], shape[1] // 2)}")
    if not bool(count(mask.reshape(shape[0], -1, 4), -1).eq(2).all()):
        raise CompressedTensorError("its bitmask does not set exactly 2 bits in every group of 4")


def _check_row_offsets(offsets: torch.Tensor, row_counts: torch.Tensor) -> None:
    expected = row_counts.cumsum(0) - row_counts
    if offsets.dtype.is_floating_point or offsets.numel() != expected.numel() or \
            not torch.equal(offsets.reshape(-1).to(torch.int64), expected):
        raise CompressedTensorError("its row_offsets disagree with the rows of its bitmask")


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ---------------------------------------------------------------- sizes


def bitmask_bytes(rows: int, columns: int, stored: int, element_size: int) -> int:
    """Bytes of the sparse-bitmask tensors (values, mask, row offsets, shape), file headers aside."""
    return stored * element_size + rows * math.ceil(columns / 8) + 8 * rows + 16


def packed_24_bytes(rows: int, columns: int, element_size: int) -> int:
    """Bytes of the sparse-24-bitmask tensors (half the values, the mask, the shape), file headers aside."""
    return rows * (columns // 2) * element_size + rows * math.ceil(columns / 8) + 16


__all__ = ["BITMASK", "FORMATS", "PACKED_24", "PARTS", "CompressedTensorError", "bitmask_bytes", "compress_24",
           "compress_bitmask", "decompress", "pack_mask", "packed_24_bytes", "packs_24", "stored_entries", "unpack_mask"]
