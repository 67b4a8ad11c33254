"""Protocol-buffer wire format for the few tf.train.Example shapes we write, encoded by hand.

The bytes equal protobuf's deterministic serialisation of TensorFlow's example.proto (a test
compares them), but a message can be assembled from parts: `schema` encodes what a sample's records
share once, and takes the activations' buffer as it comes from the device, without conversion.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varints(values: np.ndarray | Sequence[int]) -> bytes:
    """Base-128 varints of non-negative integers, concatenated (a packed repeated int64), in a few
    numpy passes rather than a Python loop per value."""
    v = np.asarray(values, np.int64).ravel()
    if not v.size:
        return b""
    if v.min() < 0:
        raise ValueError("varints: negative values are not encoded here")
    v = v.astype(np.uint64)
    width = 1 + (v[:, None] >= (np.uint64(1) << (7 * np.arange(1, 10, dtype=np.uint64)))).sum(axis=1)
    places = np.arange(int(width.max()))
    groups = (v[:, None] >> (7 * places).astype(np.uint64)) & np.uint64(0x7F)
    more = (places[None, :] < width[:, None] - 1).astype(np.uint64) << np.uint64(7)
    return (groups | more).astype(np.uint8)[places[None, :] < width[:, None]].tobytes()


def field_head(field: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return bytes([field << 3 | 2]) + varint(length)


def delimited(field: int, payload: bytes) -> bytes:
    return field_head(field, len(payload)) + payload


def map_entry(key: str, feature: bytes) -> bytes:
    """One Features.feature map entry (field 1 of Features): key = 1, value = 2."""
    return delimited(1, delimited(1, key.encode()) + delimited(2, feature))


def bytes_feature(value: bytes | str) -> bytes:
    """Feature{bytes_list: [value]}."""
    return delimited(1, delimited(1, value.encode() if isinstance(value, str) else value))


def int64_feature(values: np.ndarray | Sequence[int] | int) -> bytes:
    """Feature{int64_list: values}, packed; an empty list is still an int64_list."""
    packed = varints(np.atleast_1d(values))
    return delimited(3, delimited(1, packed) if packed else b"")
