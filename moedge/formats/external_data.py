"""The external-data files an ONNX model names, read from its protobuf without the onnx package.

A device loads bundle graphs with onnxruntime alone, and an ONNX file can point its tensors at any
path (``location`` in ``external_data``). Before a runtime hands a bundle graph to ONNX Runtime it
checks every such location against the bundle's manifest; this module lists them. It walks only the
messages that can hold tensors (graphs, nodes, attributes, functions, sparse tensors), skipping the
bytes of everything else, so it reads a large graph in about the time it takes to scan its bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from moedge._errors import MoedgeError

# Field numbers from onnx.proto (ONNX IR version 10).
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_TENSOR_EXTERNAL_DATA = 13
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_ENTRY_KEY, _ENTRY_VALUE = 1, 2

_MAX_DEPTH = 32  # nested subgraphs (If/Loop bodies); deeper means a malformed or hostile file


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of every length-delimited field of one message; others are skipped."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed
            yield field, pos, pos + size
            pos += size
        else:
            raise _Malformed
        if pos > end:
            raise _Malformed


def _tensor(buf: memoryview, start: int, end: int, out: list[str]) -> None:
    for field, a, b in _fields(buf, start, end):
        if field != _TENSOR_EXTERNAL_DATA:
            continue
        key = value = None
        for f, c, d in _fields(buf, a, b):
            if f == _ENTRY_KEY:
                key = bytes(buf[c:d])
            elif f == _ENTRY_VALUE:
                value = bytes(buf[c:d])
        if key == b"location":
            try:
                out.append((value or b"").decode("utf-8"))
            except UnicodeDecodeError:
                raise _Malformed from None


def _sparse(buf: memoryview, start: int, end: int, out: list[str]) -> None:
    for field, a, b in _fields(buf, start, end):
        if field in (_SPARSE_VALUES, _SPARSE_INDICES):
            _tensor(buf, a, b, out)


def _node(buf: memoryview, start: int, end: int, out: list[str], depth: int) -> None:
    for field, a, b in _fields(buf, start, end):
        if field != _NODE_ATTRIBUTE:
            continue
        for f, c, d in _fields(buf, a, b):
            if f in (_ATTR_T, _ATTR_TENSORS):
                _tensor(buf, c, d, out)
            elif f in (_ATTR_G, _ATTR_GRAPHS):
                _graph(buf, c, d, out, depth + 1)
            elif f in (_ATTR_SPARSE, _ATTR_SPARSES):
                _sparse(buf, c, d, out)


def _graph(buf: memoryview, start: int, end: int, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    for field, a, b in _fields(buf, start, end):
        if field == _GRAPH_INITIALIZER:
            _tensor(buf, a, b, out)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            _sparse(buf, a, b, out)
        elif field == _GRAPH_NODE:
            _node(buf, a, b, out, depth)


def external_locations(data: bytes) -> list[str]:
    """Every ``location`` an ONNX model's tensors name for their external data, in file order.

    Raises ``ValueError`` when the bytes are not a well-formed ONNX protobuf.
    """
    buf = memoryview(data)
    out: list[str] = []
    try:
        for field, a, b in _fields(buf, 0, len(buf)):
            if field == _MODEL_GRAPH:
                _graph(buf, a, b, out, 0)
            elif field == _MODEL_FUNCTIONS:
                for f, c, d in _fields(buf, a, b):
                    if f == _FUNCTION_NODE:
                        _node(buf, c, d, out, 1)
    except _Malformed:
        raise ValueError("not a well-formed ONNX protobuf") from None
    return out


def external_files(model_file: Path) -> list[str]:
    """The distinct external-data locations of ``model_file`` (relative to its folder), or one clear error."""
    try:
        data = model_file.read_bytes()
    except OSError as exc:
        raise MoedgeError(f"cannot read {model_file}: {exc.strerror or exc}") from None
    try:
        return list(dict.fromkeys(external_locations(data)))
    except ValueError:
        raise MoedgeError(
            f"{model_file} is not a readable ONNX model (malformed protobuf): re-export or re-split it"
        ) from None


def check_external_data(model_file: Path) -> None:
    """One clear error when ``model_file`` names external data that is not a regular file in its own
    folder (or below it): an exported model is read only from its folder."""
    root = os.path.realpath(model_file.parent)
    for location in external_files(model_file):
        target = os.path.realpath(model_file.parent / location) if location else root
        inside = bool(location) and not os.path.isabs(location) and target.startswith(root + os.sep)
        if not inside or not os.path.isfile(target):
            raise MoedgeError(
                f"{model_file} reads external data {location!r}, which is not a file in its folder: "
                "re-export the model (moedge export)"
            )
