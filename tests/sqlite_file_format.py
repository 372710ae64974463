"""An independent reader of SQLite's database file format (https://www.sqlite.org/fileformat2.html), written
for tests: it finds a table's interior, leaf and overflow pages and decodes its records, so a test can check
tilecrate's page reader against a second implementation and corrupt exactly one structure of a file.

It trusts nothing it reads: every page number, offset and size is checked and a bad one raises FormatError.
It never writes; tests patch files with `patch` at offsets it reports.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

LEAF, INTERIOR = 0x0D, 0x05


class FormatError(Exception):
    """The file is not what the format says (a bad page number, offset or size)."""


def varint(buf: bytes, at: int) -> tuple[int, int]:
    """(value, bytes used) of the varint at buf[at]: up to 8 bytes of 7 bits, a 9th of 8."""
    v = 0
    for i in range(9):
        if at + i >= len(buf):
            raise FormatError(f"varint at {at} runs past the end")
        b = buf[at + i]
        if i == 8:
            return ((v << 8) | b) & 0xFFFFFFFFFFFFFFFF, 9
        v = (v << 7) | (b & 0x7F)
        if not b & 0x80:
            return v, i + 1
    raise AssertionError("unreachable")


def encode_varint(v: int, width: int | None = None) -> bytes:
    """The varint of v (0 <= v < 2**64); `width` pads it with 0x80 bytes to that many bytes (SQLite reads
    non-minimal varints), 9 meaning the full nine-byte form."""
    if not 0 <= v < 1 << 64:
        raise ValueError("varints hold 0 <= v < 2**64")
    if width == 9 or v >= 1 << 56:
        out = [v & 0xFF]
        v >>= 8
        for _ in range(8):
            out.append(0x80 | (v & 0x7F))
            v >>= 7
        return bytes(reversed(out))
    groups = [v & 0x7F]
    v >>= 7
    while v:
        groups.append(v & 0x7F)
        v >>= 7
    if width is not None:
        if width < len(groups):
            raise ValueError(f"{v} needs more than {width} bytes")
        groups += [0] * (width - len(groups))
    groups.reverse()
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def serial_size(t: int) -> int:
    """Bytes a value of serial type t takes in a record's body."""
    if t in (10, 11):
        raise FormatError(f"reserved serial type {t}")
    if t >= 12:
        return (t - 12) // 2
    return (0, 1, 2, 3, 4, 6, 8, 8, 0, 0)[t]


@dataclass
class Cell:
    """One table leaf cell: where it is and where its payload lies."""

    rowid: int
    page: int                   # the leaf page
    offset: int                 # the cell's offset in its page
    payload_size: int
    header_len: int             # bytes of the payload-size and rowid varints
    local: int                  # payload bytes on the leaf page
    overflow: list[int] = field(default_factory=list)   # the overflow chain's pages, in order

    @property
    def pointer_at(self) -> int:
        """Offset in the page of the first overflow page's number (only when `overflow`)."""
        return self.offset + self.header_len + self.local


@dataclass
class Tree:
    """A table b-tree: its pages by kind and each page's parent."""

    root: int
    interior: list[int] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)
    parent: dict[int, int] = field(default_factory=dict)
    depth: dict[int, int] = field(default_factory=dict)


class Db:
    """A database file read whole into memory (test files are small)."""

    def __init__(self, path):
        with open(path, "rb") as f:
            self.data = f.read()
        if len(self.data) < 100 or not self.data.startswith(b"SQLite format 3\x00"):
            raise FormatError("not an SQLite database")
        ps = struct.unpack_from(">H", self.data, 16)[0]
        self.page_size = 65536 if ps == 1 else ps
        if self.page_size < 512 or self.page_size & (self.page_size - 1):
            raise FormatError(f"page size {self.page_size}")
        self.reserved = self.data[20]
        self.usable = self.page_size - self.reserved
        self.pages = len(self.data) // self.page_size
        self.encoding = struct.unpack_from(">I", self.data, 56)[0]     # 1 UTF-8, 2 UTF-16le, 3 UTF-16be
        self.wal = self.data[18] == 2 and self.data[19] == 2
        self.header = self.data[:100]

    def page(self, n: int) -> bytes:
        """Page n (1-based)."""
        if not 1 <= n <= self.pages:
            raise FormatError(f"page {n} is not in the file's {self.pages} pages")
        return self.data[(n - 1) * self.page_size:n * self.page_size]

    def page_offset(self, n: int) -> int:
        """Where page n starts in the file."""
        return (n - 1) * self.page_size

    def btree_header(self, n: int) -> dict:
        """The b-tree page header of page n: type, cells, content start, right-most child (interior)."""
        p = self.page(n)
        h = 100 if n == 1 else 0
        kind = p[h]
        if kind not in (2, 5, 10, 13):
            raise FormatError(f"page {n} is not a b-tree page (type {kind})")
        cells = struct.unpack_from(">H", p, h + 3)[0]
        size = 12 if kind in (2, 5) else 8
        out = {"type": kind, "at": h, "cells": cells, "ptrs": h + size,
               "content": struct.unpack_from(">H", p, h + 5)[0] or 65536}
        if kind in (2, 5):
            out["right"] = struct.unpack_from(">I", p, h + 8)[0]
        if h + size + 2 * cells > self.usable:
            raise FormatError(f"page {n}: {cells} cell pointers do not fit")
        return out

    def cell_offsets(self, n: int) -> list[int]:
        """The offsets of page n's cells, in the order of its cell pointer array."""
        hd = self.btree_header(n)
        p = self.page(n)
        offs = [struct.unpack_from(">H", p, hd["ptrs"] + 2 * i)[0] for i in range(hd["cells"])]
        for o in offs:
            if not hd["ptrs"] + 2 * hd["cells"] <= o < self.usable:
                raise FormatError(f"page {n}: a cell at {o} outside the cell content area")
        return offs

    def interior_cells(self, n: int) -> list[tuple[int, int, int]]:
        """(cell offset, left child, key) of a table interior page's cells."""
        p = self.page(n)
        if self.btree_header(n)["type"] != INTERIOR:
            raise FormatError(f"page {n} is not a table interior page")
        out = []
        for o in self.cell_offsets(n):
            if o + 5 > self.usable:
                raise FormatError(f"page {n}: cell at {o} runs past the page")
            child = struct.unpack_from(">I", p, o)[0]
            key, _ = varint(p, o + 4)
            out.append((o, child, key))
        return out

    def tree(self, root: int) -> Tree:
        """Every page of the table b-tree at `root` (a page met twice is an error)."""
        t = Tree(root)
        todo = [(root, 0, 0)]
        seen = set()
        while todo:
            n, parent, depth = todo.pop()
            if n in seen:
                raise FormatError(f"page {n} is reached twice")
            seen.add(n)
            t.parent[n], t.depth[n] = parent, depth
            kind = self.btree_header(n)["type"]
            if kind == LEAF:
                t.leaves.append(n)
            elif kind == INTERIOR:
                t.interior.append(n)
                kids = [c for _, c, _ in self.interior_cells(n)] + [self.btree_header(n)["right"]]
                todo.extend((c, n, depth + 1) for c in reversed(kids))
            else:
                raise FormatError(f"page {n} is an index page inside a table b-tree")
        return t

    def local_size(self, payload: int) -> int:
        """Payload bytes a table leaf cell keeps on its page (the rest spills to overflow pages)."""
        u = self.usable
        x = u - 35
        if payload <= x:
            return payload
        m = ((u - 12) * 32 // 255) - 23
        k = m + (payload - m) % (u - 4)
        return k if k <= x else m

    def leaf_cells(self, n: int) -> list[Cell]:
        """The cells of table leaf page n, their overflow chains followed."""
        p = self.page(n)
        out = []
        for o in self.cell_offsets(n):
            size, a = varint(p, o)
            rowid, b = varint(p, o + a)
            rowid = rowid - (1 << 64) if rowid >= 1 << 63 else rowid
            local = self.local_size(size)
            cell = Cell(rowid, n, o, size, a + b, local)
            if o + a + b + local + (4 if local < size else 0) > self.usable:
                raise FormatError(f"page {n}: cell at {o} runs past the page")
            if local < size:
                nxt = struct.unpack_from(">I", p, cell.pointer_at)[0]
                left = size - local
                while left > 0:
                    if nxt in cell.overflow or not 2 <= nxt <= self.pages:
                        raise FormatError(f"page {n}: rowid {rowid}'s overflow chain reaches page {nxt}")
                    cell.overflow.append(nxt)
                    left -= self.usable - 4
                    nxt = struct.unpack_from(">I", self.page(nxt), 0)[0]
            out.append(cell)
        return out

    def cells(self, root: int) -> list[Cell]:
        """Every leaf cell of a table, in key order."""
        t = self.tree(root)
        order = []

        def walk(n):
            if self.btree_header(n)["type"] == LEAF:
                order.extend(self.leaf_cells(n))
                return
            for _, child, _ in self.interior_cells(n):
                walk(child)
            walk(self.btree_header(n)["right"])

        walk(t.root)
        return order

    def payload(self, cell: Cell) -> bytes:
        """A cell's whole payload (local part and overflow pages)."""
        p = self.page(cell.page)
        start = cell.offset + cell.header_len
        out = bytearray(p[start:start + cell.local])
        for n in cell.overflow:
            want = min(cell.payload_size - len(out), self.usable - 4)
            out += self.page(n)[4:4 + want]
        if len(out) != cell.payload_size:
            raise FormatError(f"rowid {cell.rowid}: payload of {len(out)} bytes, {cell.payload_size} declared")
        return bytes(out)

    def record(self, cell: Cell) -> list:
        """A cell's values: None, int, float, bytes (blobs) or ('text', raw bytes)."""
        return decode_record(self.payload(cell))


def decode_record(rec: bytes) -> list:
    """The values of one record (see Db.record)."""
    hlen, used = varint(rec, 0)
    if hlen > len(rec) or hlen < used:
        raise FormatError(f"record header of {hlen} bytes in a record of {len(rec)}")
    types = []
    at = used
    while at < hlen:
        t, k = varint(rec, at)
        types.append(t)
        at += k
    out = []
    body = hlen
    for t in types:
        n = serial_size(t)
        if body + n > len(rec):
            raise FormatError(f"a value of {n} bytes at {body} runs past the record's {len(rec)} bytes")
        raw = rec[body:body + n]
        body += n
        if t == 0:
            out.append(None)
        elif 1 <= t <= 6:
            out.append(int.from_bytes(raw, "big", signed=True))
        elif t == 7:
            out.append(struct.unpack(">d", raw)[0])
        elif t in (8, 9):
            out.append(t - 8)
        elif t % 2 == 0:
            out.append(bytes(raw))
        else:
            out.append(("text", bytes(raw)))
    return out


def record_types(rec: bytes) -> list[tuple[int, int, int]]:
    """(serial type, offset of its varint in the record, varint length) of a record's header."""
    hlen, used = varint(rec, 0)
    out = []
    at = used
    while at < hlen:
        t, k = varint(rec, at)
        out.append((t, at, k))
        at += k
    return out


def patch(path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def root_page(path, table: str) -> int:
    """A table's root page, from sqlite_master (read through Python's sqlite3)."""
    import sqlite3

    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT rootpage FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    finally:
        db.close()
    if row is None or not row[0]:
        raise FormatError(f"no table {table}")
    return row[0]
