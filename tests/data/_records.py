"""An independent sequential parser of dmlc-core's RecordIO framing (struct only), so tests compare the
library against it rather than against itself."""

from __future__ import annotations

import struct

MAGIC = 0xCED7230A


def reference_records(path: str) -> list[tuple[int, bytes, int]]:
    """``(offset, record, parts)`` of every record in file order, parsed the plain way."""
    with open(path, "rb") as handle:
        blob = handle.read()
    records, offset = [], 0
    while offset < len(blob):
        start, parts, chunks = offset, 0, []
        while True:
            magic, lrec = struct.unpack_from("<II", blob, offset)
            assert magic == MAGIC, f"bad magic at {offset}"
            flag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            chunks.append(blob[offset + 8 : offset + 8 + length])
            offset += 8 + (length + 3) // 4 * 4
            parts += 1
            if flag in (0, 3):
                break
        records.append((start, struct.pack("<I", MAGIC).join(chunks), parts))
    return records


def reference_header(record: bytes) -> tuple[int, object, int, int, bytes]:
    """``(flag, label, id, id2, payload)`` of an image record, parsed the plain way."""
    flag, label, ident, ident2 = struct.unpack_from("<IfQQ", record)
    rest = record[24:]
    if flag > 0:
        label = list(struct.unpack_from(f"<{flag}f", rest))
        rest = rest[4 * flag :]
    return flag, label, ident, ident2, rest
