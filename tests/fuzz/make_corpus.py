#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (corpus/<target>/) with Python's standard library only.

The seeds are committed; run this again only to change them (python3 tests/fuzz/make_corpus.py).
Each is a small valid input, or an invalid one close to valid, that gives libFuzzer a start on
every branch of the format.
"""

import json
import os
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# lmhead.v1.DataType
BF16, FP16, FP32, INT32, INT64 = 1, 2, 3, 4, 5
SIZE = {BF16: 2, FP16: 2, FP32: 4, INT32: 4, INT64: 8}


def varint(value):
    value &= (1 << 64) - 1  # int64 fields encode negatives as 10-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wire_tensor(dtype, shape, data=None, packed=True):
    """An lmhead.v1.Tensor: dtype = 1, repeated int64 shape = 2, bytes data = 3."""
    if data is None:
        numel = 1
        for dim in shape:
            numel *= dim
        data = bytes((i * 7) & 0xFF for i in range(numel * SIZE.get(dtype, 1)))
    out = b"\x08" + varint(dtype) if dtype else b""
    if packed and shape:
        dims = b"".join(varint(d) for d in shape)
        out += b"\x12" + varint(len(dims)) + dims
    else:
        out += b"".join(b"\x10" + varint(d) for d in shape)
    if data:
        out += b"\x1a" + varint(len(data)) + data
    return out


def in_shared_memory(tensor, region, offset, byte_size):
    """`tensor` (wire bytes) with Tensor.shared_memory = 4: a SharedMemoryRef (region = 1,
    offset = 2, byte_size = 3)."""
    ref = (b"\x0a" + varint(len(region)) + region + b"\x10" + varint(offset) + b"\x18"
           + varint(byte_size))
    return tensor + b"\x22" + varint(len(ref)) + ref


def npy(descr, shape, data, version=1, fortran=False):
    shape_text = "(" + "".join(f"{d}, " for d in shape)[:-2] + ("," if len(shape) == 1 else "") + ")"
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    prefix = 10 if version == 1 else 12
    header += " " * ((64 - (prefix + len(header) + 1) % 64) % 64) + "\n"
    encoded = header.encode("latin1" if version < 3 else "utf-8")
    length = struct.pack("<H", len(encoded)) if version == 1 else struct.pack("<I", len(encoded))
    return b"\x93NUMPY" + bytes([version, 0]) + length + encoded + data


def safetensors(tensors, metadata=None, raw_header=None):
    """tensors: [(name, dtype, shape, bytes)], laid out in order, as the reference writes."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset, buffer = 0, b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        buffer += data
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":"))
    text = text.encode() + b" " * ((8 - len(text.encode()) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + buffer


def seeds():
    codec = {
        "hidden_fp32_1x2x4": wire_tensor(FP32, [1, 2, 4]),
        "hidden_bf16_2x1x3": wire_tensor(BF16, [2, 1, 3]),
        "hidden_fp16_1x1x2_unpacked": wire_tensor(FP16, [1, 1, 2], packed=False),
        "hidden_empty_0x4x8": wire_tensor(FP32, [0, 4, 8]),
        "labels_int64_1x3": wire_tensor(INT64, [1, 3], struct.pack("<3q", 5, -100, 0)),
        "labels_int32_2x2": wire_tensor(INT32, [2, 2], struct.pack("<4i", 1, 2, -100, 3)),
        "div_factor_fp32_scalar": wire_tensor(FP32, [], struct.pack("<f", 2.5)),
        "div_factor_fp32_2x3": wire_tensor(FP32, [2, 3]),
        "bad_no_dtype": wire_tensor(0, [1, 2, 2], b"\0" * 16),
        "bad_negative_dim": wire_tensor(FP32, [1, -2, 2], b""),
        "bad_byte_length": wire_tensor(FP32, [1, 2, 2], b"\0" * 15),
        "bad_rank_9": wire_tensor(FP32, [1] * 9, b"\0" * 4),
        "shm_hidden_fp32_1x2x4": in_shared_memory(wire_tensor(FP32, [1, 2, 4], b""), b"r" * 32,
                                                  64, 32),
        "shm_labels_int64_1x3": in_shared_memory(wire_tensor(INT64, [1, 3], b""), b"r", 0, 24),
        "bad_shm_and_data": in_shared_memory(wire_tensor(FP32, [1, 2, 4]), b"r", 0, 32),
        "bad_shm_byte_size": in_shared_memory(wire_tensor(FP32, [1, 2, 4], b""), b"r", 0, 31),
    }
    f32 = struct.pack("<6f", 0.5, -1.0, 2.0, 3.5, -0.25, 1e-3)
    npys = {
        "f4_2x3.npy": npy("<f4", [2, 3], f32),
        "f2_4.npy": npy("<f2", [4], b"\x00\x3c" * 4),
        "i4_scalar.npy": npy("<i4", [], struct.pack("<i", 7)),
        "i8_2x2_v2.npy": npy("<i8", [2, 2], struct.pack("<4q", 1, -100, 3, 4), version=2),
        "f4_0x5_v3.npy": npy("<f4", [0, 5], b"", version=3),
        "bad_fortran.npy": npy("<f4", [2, 3], f32, fortran=True),
        "bad_big_endian.npy": npy(">f4", [2, 3], f32),
        "bad_truncated.npy": npy("<f4", [2, 3], f32[:-4]),
    }
    st = {
        "f32_2x2.safetensors": safetensors([("w", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4))]),
        "bf16_and_i64_metadata.safetensors": safetensors(
            [("a", "BF16", [3], b"\x80\x3f" * 3), ("b", "I64", [1, 2], struct.pack("<2q", 1, 2))],
            metadata={"format": "pt", "note": "seed"}),
        "every_other_dtype.safetensors": safetensors(
            [("d", "F64", [1], struct.pack("<d", 1.5)), ("h", "F16", [2], b"\x00\x3c" * 2),
             ("i", "I32", [1], struct.pack("<i", -3)), ("s", "I16", [2], b"\x01\x00\x02\x00"),
             ("c", "I8", [1], b"\xff"), ("u", "U8", [2], b"\x01\x02"), ("t", "BOOL", [1], b"\x01")]),
        "empty_and_scalar.safetensors": safetensors(
            [("e", "F32", [0, 3], b""), ("x", "F32", [], struct.pack("<f", 7))]),
        "bad_overlap.safetensors": safetensors(
            [], raw_header='{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                           '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}') + b"\0" * 8,
        "bad_offsets.safetensors": safetensors(
            [], raw_header='{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,12]}}') + b"\0" * 8,
    }
    configs = {
        "empty.json": "{}",
        "every_field.json": json.dumps({
            "name": "default",
            "layer_norm": {"name": "qwen_rms", "eps": 1e-6, "elementwise_affine": True,
                           "bias": False, "full_precision": False, "dtype": "bfloat16"},
            "bias": False, "dtype": "bfloat16", "loss_implementation": "fused_linear"}),
        "normalized_nulls.json": json.dumps({"name": "normalized", "layer_norm": None,
                                             "bias": None, "dtype": None,
                                             "loss_implementation": None}),
        "rms.json": json.dumps({"layer_norm": {"name": "rms", "eps": None, "bias": None}}),
        "l2_norm.json": json.dumps({"name": "normalized", "layer_norm": {"name": "l2_norm"},
                                    "dtype": "float16"}),
        "fused_rms.json": json.dumps({"layer_norm": {"name": "fused_rms", "eps": 1e-5,
                                                     "full_precision": True}}),
        "bad_unknown_field.json": '{"name": "default", "vocab": 3}',
        "bad_type.json": '{"layer_norm": {"eps": "small"}}',
    }
    return {"tensor_codec": codec, "npy": npys, "safetensors": st,
            "config_json": {k: v.encode() for k, v in configs.items()}}


def main():
    for target, files in seeds().items():
        folder = os.path.join(HERE, "corpus", target)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for name, data in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
        print(f"{folder}: {len(files)} seeds")


if __name__ == "__main__":
    main()
