"""Arrays <-> lmhead.v1.Tensor.

Encoding accepts torch tensors (when torch is installed), numpy arrays, and `BF16` (raw bfloat16
bits in a uint16 array, since numpy has no bfloat16). Decoding yields `Decoded`: a numpy array
plus the wire dtype; bfloat16 values are widened to float32 there (exactly), and converted back
to torch.bfloat16 when the caller wants torch. BOOL (outputs only: the server takes none) decodes
to numpy bool and torch.bool.
"""

from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from lmhead_client._proto.lmhead.v1 import lmhead_pb2 as pb

try:  # torch is optional
    import torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    torch = None


class BF16:
    """bfloat16 values given as their raw bits: a uint16 (or int16) numpy array.

    `BF16(bits)` can stand wherever the client takes a tensor (hidden states, a loss div
    factor). `BF16.from_float32(a)` rounds float32 values to the nearest bfloat16.
    """

    def __init__(self, bits):
        bits = np.asarray(bits)
        if bits.dtype not in (np.uint16, np.int16):
            raise TypeError(f"BF16 takes the raw bits as uint16 or int16, got {bits.dtype}")
        self.bits = bits.view(np.uint16)

    @classmethod
    def from_float32(cls, values) -> "BF16":
        return cls(float32_to_bf16_bits(np.asarray(values, dtype=np.float32)))

    @property
    def shape(self):
        return self.bits.shape

    def __getitem__(self, index) -> "BF16":
        return BF16(self.bits[index])

    def to_float32(self) -> np.ndarray:
        return bf16_bits_to_float32(self.bits)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    wide = np.asarray(bits, dtype=np.uint32).copy()
    np.left_shift(wide, 16, out=wide)  # in place: 0-d arrays stay arrays
    return wide.view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch does; NaN stays NaN."""
    values = np.asarray(values, dtype=np.float32)
    u = values.view(np.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).reshape(values.shape)


_NUMPY_TO_WIRE = {
    np.dtype(np.float16): pb.DATA_TYPE_FP16,
    np.dtype(np.float32): pb.DATA_TYPE_FP32,
    np.dtype(np.int32): pb.DATA_TYPE_INT32,
    np.dtype(np.int64): pb.DATA_TYPE_INT64,
}
_WIRE_TO_NUMPY = {v: k for k, v in _NUMPY_TO_WIRE.items()}
_WIRE_TO_NUMPY[pb.DATA_TYPE_BF16] = np.dtype(np.uint16)
# Decoded only: requests carry no booleans, so encoding a bool array stays a TypeError.
_WIRE_TO_NUMPY[pb.DATA_TYPE_BOOL] = np.dtype(np.bool_)

_DTYPE_NAMES = {
    "bf16": pb.DATA_TYPE_BF16, "bfloat16": pb.DATA_TYPE_BF16,
    "fp16": pb.DATA_TYPE_FP16, "float16": pb.DATA_TYPE_FP16, "half": pb.DATA_TYPE_FP16,
    "fp32": pb.DATA_TYPE_FP32, "float32": pb.DATA_TYPE_FP32, "float": pb.DATA_TYPE_FP32,
}


def is_torch(value) -> bool:
    return torch is not None and isinstance(value, torch.Tensor)


_TORCH_TO_WIRE = {} if torch is None else {
    torch.float16: pb.DATA_TYPE_FP16,
    torch.float32: pb.DATA_TYPE_FP32,
    torch.bfloat16: pb.DATA_TYPE_BF16,
    torch.int32: pb.DATA_TYPE_INT32,
    torch.int64: pb.DATA_TYPE_INT64,
}
_ITEMSIZE = {wire: numpy_dtype.itemsize for wire, numpy_dtype in _WIRE_TO_NUMPY.items()}


class TensorLayout(NamedTuple):
    """The shape and wire dtype of a tensor, and its size in bytes on the wire."""

    shape: Tuple[int, ...]
    dtype: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def layout(value) -> Optional[TensorLayout]:
    """The layout of a tensor `write_into` can copy as it is: a torch tensor (on any device), a
    numpy array of native byte order, or BF16, of a wire dtype. None for anything else (which
    goes inline, where wire_array accepts or refuses it)."""
    if isinstance(value, BF16):
        return TensorLayout(tuple(value.bits.shape), pb.DATA_TYPE_BF16)
    if is_torch(value):
        dtype = _TORCH_TO_WIRE.get(value.dtype)
        return None if dtype is None else TensorLayout(tuple(value.shape), dtype)
    if isinstance(value, np.ndarray) and value.dtype.isnative:
        dtype = _NUMPY_TO_WIRE.get(value.dtype)
        return None if dtype is None else TensorLayout(value.shape, dtype)
    return None


def write_into(value, buffer: memoryview, offset: int) -> None:
    """Copies the elements of `value` (see `layout`) into buffer[offset:] in C order,
    little-endian: one copy, from whatever strides it has (a CUDA tensor: one device-to-host
    copy)."""
    if is_torch(value):
        value = value.detach()
        if value.is_cuda or value.device.type != "cpu":
            target = torch.frombuffer(buffer, dtype=value.dtype, count=value.numel(),
                                      offset=offset)
            target.view(value.shape).copy_(value)
            return
        # A host tensor is copied by numpy: torch's copy_ hands a large copy to its thread pool,
        # whose wake-up cost more than the copy itself on a busy host (measured).
        array = (value.view(torch.int16).numpy().view(np.uint16)
                 if value.dtype == torch.bfloat16 else value.numpy())
    else:
        array = value.bits if isinstance(value, BF16) else value
    target = np.ndarray(array.shape, array.dtype.newbyteorder("<"), buffer=buffer, offset=offset)
    np.copyto(target, array, casting="no")


def wire_dtype(dtype) -> int:
    """A float dtype named by a string ("bf16", "float32", ...), torch or numpy, as DataType."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype '{dtype}'; expected one of {sorted(_DTYPE_NAMES)}")
        return _DTYPE_NAMES[dtype.lower()]
    if torch is not None and isinstance(dtype, torch.dtype):
        return _DTYPE_NAMES[str(dtype).replace("torch.", "")]
    return _NUMPY_TO_WIRE[np.dtype(dtype)]


def wire_array(value) -> Tuple[np.ndarray, int]:
    """(C-contiguous little-endian array, lmhead.v1.DataType) of a tensor, without copying when
    it is already laid out so. Dtypes are never converted: a dtype the wire lacks (float64,
    uint8, bool, ...) is a TypeError."""
    if isinstance(value, BF16):
        array, dtype = value.bits, pb.DATA_TYPE_BF16
    elif is_torch(value):
        value = value.detach().cpu().contiguous()
        if value.dtype == torch.bfloat16:
            array, dtype = value.view(torch.int16).numpy().view(np.uint16), pb.DATA_TYPE_BF16
        else:
            array = value.numpy()
            dtype = _NUMPY_TO_WIRE.get(array.dtype)
    else:
        array = np.asarray(value)
        dtype = _NUMPY_TO_WIRE.get(array.dtype)
    if dtype is None:
        raise TypeError(f"dtype {array.dtype} has no lmhead.v1.DataType (expected bfloat16, "
                        "float16, float32, int32 or int64); convert it first")
    # order="C" keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d).
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False), dtype


def encode(value) -> pb.Tensor:
    """A tensor as an lmhead.v1.Tensor message (for small tensors; see WireRequest)."""
    array, dtype = wire_array(value)
    return pb.Tensor(dtype=dtype, shape=list(array.shape), data=array.tobytes())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class WireRequest:
    """A ForwardRequest whose large tensors are written straight from their arrays.

    Building a protobuf message copies a bytes field, and serialising it copies it again; for
    hidden states of hundreds of MiB those copies cost more than the network. `serialize()`
    writes the small fields with protobuf and appends each large tensor as its encoded field
    (protobuf merges repeated occurrences of a message field), copying the data once.
    """

    # ForwardRequest field numbers of the tensors sent this way.
    HIDDEN_STATES = 2
    LABELS = 3

    def __init__(self, small: pb.ForwardRequest):
        self.small = small
        self.large: List[Tuple[int, np.ndarray, int]] = []  # (field, array, dtype)

    def add(self, field: int, value) -> None:
        array, dtype = wire_array(value)
        self.large.append((field, array, dtype))

    def serialize(self) -> bytes:
        parts = [self.small.SerializeToString()]
        for field, array, dtype in self.large:
            header = pb.Tensor(dtype=dtype, shape=list(array.shape)).SerializeToString()
            data = memoryview(array).cast("B") if array.size else b""
            data_field = b"\x1a" + _varint(len(data))  # Tensor.data is field 3, bytes
            length = len(header) + len(data_field) + len(data)
            parts += [_varint(field << 3 | 2), _varint(length), header, data_field, data]
        return b"".join(parts)

    def proto(self) -> pb.ForwardRequest:
        """The same request as a protobuf message (copies; for inspection and tests)."""
        return pb.ForwardRequest.FromString(self.serialize())


class Decoded(NamedTuple):
    """A decoded tensor: values (bfloat16 widened to float32) and the wire dtype."""

    array: np.ndarray
    dtype: int


def decode(tensor: pb.Tensor) -> Decoded:
    return _decode(tensor.data, 0, -1, tensor.dtype, tuple(tensor.shape))


def decode_from(buffer, offset: int, byte_size: int, dtype: int, shape: Tuple[int, ...]
                ) -> Decoded:
    """A tensor of `shape` and wire `dtype` that lies in buffer[offset:offset + byte_size],
    copied out (exactly as `decode` copies a tensor out of a message)."""
    numpy_dtype = _WIRE_TO_NUMPY.get(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if numpy_dtype is not None and count * numpy_dtype.itemsize != byte_size:
        raise ValueError(f"{byte_size} bytes for shape {list(shape)}")
    if offset + byte_size > len(buffer):
        raise ValueError(f"bytes [{offset}, {offset + byte_size}) are past the end of the "
                         f"region ({len(buffer)} bytes)")
    return _decode(buffer, offset, count, dtype, shape)


def _decode(data, offset: int, count: int, dtype: int, shape: Tuple[int, ...]) -> Decoded:
    numpy_dtype = _WIRE_TO_NUMPY.get(dtype)
    if numpy_dtype is None:
        raise ValueError(f"the server sent a tensor of unknown dtype {dtype}")
    array = np.frombuffer(data, dtype=numpy_dtype.newbyteorder("<"), count=count, offset=offset)
    if dtype == pb.DATA_TYPE_BF16:
        array = bf16_bits_to_float32(array.reshape(shape))  # widened into a new array
    elif dtype == pb.DATA_TYPE_BOOL:
        # Any nonzero byte is true (numpy would keep other bytes as they are in a bool array).
        array = array.view(np.uint8).astype(np.bool_).reshape(shape)
    else:
        array = array.astype(numpy_dtype).reshape(shape)  # a native, writable copy
    return Decoded(array, dtype)


def round_to(array: np.ndarray, dtype: int) -> np.ndarray:
    """Values computed in a wider type (float64), rounded to the wire dtype `dtype` (bfloat16
    values stay in float32 arrays)."""
    if dtype == pb.DATA_TYPE_BF16:
        return bf16_bits_to_float32(float32_to_bf16_bits(array.astype(np.float32)))
    return array.astype(_WIRE_TO_NUMPY[dtype])


def to_user(decoded: Decoded, as_torch: bool):
    """The decoded tensor as torch (bfloat16 restored) or numpy (bfloat16 as float32)."""
    if not as_torch:
        return decoded.array
    tensor = torch.from_numpy(decoded.array)
    return tensor.to(torch.bfloat16) if decoded.dtype == pb.DATA_TYPE_BF16 else tensor
