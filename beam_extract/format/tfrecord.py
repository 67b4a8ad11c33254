"""TFRecord framing: [length u64][masked crc32c of length][data][masked crc32c of data], little-endian."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

from beam_extract.format.storage import open_read


FRAMING_BYTES = 16  # a record's length, its CRC and the data's CRC


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_record(handle: BinaryIO, data: bytes) -> int:
    """Appends one record; returns the bytes written."""
    length = struct.pack("<Q", len(data))
    handle.write(length + struct.pack("<I", _masked_crc(length)))
    handle.write(data)  # not joined to its framing: that would copy a record of activations again
    handle.write(struct.pack("<I", _masked_crc(data)))
    return len(data) + FRAMING_BYTES


def iter_tfrecord(path: str) -> Iterator[bytes]:
    """Raw records of one TFRecord file (local or gs://), checking both CRCs of every record."""
    with open_read(path) as handle:
        while header := handle.read(12):
            if len(header) != 12:
                raise ValueError(f"{path}: truncated record header")
            (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if _masked_crc(header[:8]) != length_crc:
                raise ValueError(f"{path}: corrupt record length")
            data, footer = handle.read(length), handle.read(4)
            if len(data) != length or len(footer) != 4 or _masked_crc(data) != struct.unpack("<I", footer)[0]:
                raise ValueError(f"{path}: truncated or corrupt record")
            yield data
