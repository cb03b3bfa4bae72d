"""ONNX files on disk: a graph and its external data (`<graph>.onnx.data`), gathered into one page-aligned file.

Above protobuf's 2 GB limit a graph's weights must live outside it. torch's exporter then writes one file per
tensor (205 for a 2B decoder), which onnxruntime's quantization tools refuse; every graph written here ends with
its weights in exactly one `<graph>.data` file (or none), which the manifest hashes like any other file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import onnx


def data_file(graph: Path) -> Path:
    """Where a graph's external data lives: `<graph>.data` beside it."""
    return graph.with_name(graph.name + ".data")


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: its initializers and the tensors in node attributes (Constant values, which
    quantizers also store externally), subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _tensors(a.g)
            for g in a.graphs:
                yield from _tensors(g)


def gather_external_data(graph: Path, leftovers: list[Path] = (), threshold: int = 1024,
                         align: int = 4096) -> None:
    """Move every tensor of `graph` of at least `threshold` bytes (initializers and attribute tensors, inline or in
    other files) into the one file `data_file(graph)`, page-aligned (so runtimes can map it), smaller external ones
    back inline, and delete `leftovers`. Streams tensor by tensor: the graph is read without its external data, so
    memory stays at one tensor whatever the size. Every external reference is rewritten, so none can point into a
    replaced file (onnxruntime's quantizers write Constant nodes' tensors externally too)."""
    proto = onnx.load(str(graph), load_external_data=False)
    data = data_file(graph)
    partial = data.with_name(data.name + ".partial")      # the old data file may be one of the sources
    with open(partial, "wb") as out:
        for t in _tensors(proto.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(graph.parent / info["location"], "rb") as src:
                    src.seek(int(info.get("offset", 0)))
                    raw = src.read(int(info["length"])) if "length" in info else src.read()
            elif len(t.raw_data) >= threshold:
                raw = t.raw_data
            else:
                continue
            del t.external_data[:]
            if len(raw) < threshold:      # small tensors stay inline: shape inference must read them there
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw
                continue
            out.seek(-out.tell() % align, 1)
            offset = out.tell()
            out.write(raw)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(len(raw)))):
                t.external_data.add(key=key, value=value)
        size = out.tell()
    partial.replace(data)
    if size == 0:
        data.unlink()
    onnx.save(proto, str(graph))
    for f in leftovers:
        if f != data and f.exists():
            f.unlink()


def graph_bytes(graph: Path) -> int:
    """The size of a graph with its external data."""
    data = data_file(graph)
    return graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)
