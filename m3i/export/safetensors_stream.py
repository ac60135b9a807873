"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. The format is a
little-endian u64 header length, a JSON header (name -> dtype, shape, byte offsets;
``__metadata__``), padded to 8 bytes, then the tensors' bytes back to back. Knowing the
names, shapes and dtypes up front is enough to write the header first and then stream
each tensor as it is produced, so at most one converted tensor is alive at a time.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Iterable, Sequence

import torch

__all__ = ["TensorSpec", "write_safetensors", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
"""``(name, shape, dtype)`` of one tensor in the file."""


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_safetensors(
    path: str | Path,
    specs: Sequence[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``tensors`` (in the order of ``specs``) to ``path`` in safetensors format.

    Args:
        path: Output file.
        specs: Name, shape and dtype of every tensor, in file order.
        tensors: ``(name, tensor)`` pairs in the same order, produced lazily.
        metadata: The header's ``__metadata__`` (string values only).

    Returns:
        Bytes written.

    Raises:
        ValueError: When a produced tensor's name, shape or dtype differs from its spec, or the
            counts differ (the partial file is removed).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in specs:
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; safetensors allows {sorted(map(str, SAFETENSORS_DTYPES))}")
        n = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors itself pads: tensor data starts 8-byte aligned
    path = Path(path)
    written = 0
    try:
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            it = iter(tensors)
            for name, shape, dtype in specs:
                got = next(it, None)
                if got is None:
                    raise ValueError(f"safetensors {path.name}: tensor {name!r} was never produced")
                got_name, t = got
                if got_name != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    raise ValueError(
                        f"safetensors {path.name}: expected {name!r} {tuple(shape)} {dtype}, "
                        f"got {got_name!r} {tuple(t.shape)} {t.dtype}"
                    )
                # The tensor's own bytes (no copy when contiguous): a reinterpreting view as uint8.
                f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                written += _nbytes(shape, dtype)
                del t, got
            if next(it, None) is not None:
                raise ValueError(f"safetensors {path.name}: more tensors produced than the {len(specs)} specified")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    assert written == offset
    return 8 + len(raw) + written
