"""ONNX files on disk: a graph and its external data (`<graph>.onnx.data`), gathered into one page-aligned file.

Above protobuf's 2 GB limit a graph's weights must live outside it. torch's exporter then writes one file per
tensor (205 for a 2B decoder), which onnxruntime's quantization tools refuse; every graph written here ends with
its weights in exactly one `<graph>.data` file (or none), which the manifest hashes like any other file.

A tensor can also be *shared*: the token embedding table of a tied model is the LM head's weight, transposed. It is
stored once, in `embeddings.safetensors`, in the layout the head's MatMul needs ([hidden, vocab], page-aligned),
and the graph's head initializer points into that file (ONNX external data may name any file and offset); the
runtimes look token embeddings up as its columns (`EmbeddingTable`). At 2B that saves 1.24 GB per graph.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from bard_deploy.errors import ExportError

ROWS, COLUMNS = "embed_tokens", "embed_tokens.T"     # the table's key: [vocab, hidden] or transposed
ALIGN = 4096


@dataclass(frozen=True)
class Shared:
    """Where a shared tensor's bytes live: `file` (read to check them), named `location` relative to the graph."""

    file: Path
    location: str
    offset: int
    length: int


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


def _point(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=key, value=value)


def _read(path: Path, offset: int, length: int | None) -> bytes:
    with open(path, "rb") as src:
        src.seek(offset)
        return src.read(length) if length is not None else src.read()


def gather_external_data(graph: Path, leftovers: list[Path] = (), threshold: int = 1024,
                         align: int = ALIGN, shared: dict[str, Shared] | None = None) -> None:
    """Move every tensor of `graph` of at least `threshold` bytes (initializers and attribute tensors, inline or in
    other files) into the one file `data_file(graph)`, page-aligned (so runtimes can map it), smaller external ones
    back inline, and delete `leftovers`. Streams tensor by tensor: the graph is read without its external data, so
    memory stays at one tensor whatever the size. Every external reference is rewritten, so none can point into a
    replaced file (onnxruntime's quantizers write Constant nodes' tensors externally too).

    `shared`: initializers (by name) that point into another file instead, once their bytes are checked to be
    exactly that file's (an ExportError otherwise: a graph never silently reads another tensor)."""
    proto = onnx.load(str(graph), load_external_data=False)
    data = data_file(graph)
    shared = shared or {}
    partial = data.with_name(data.name + ".partial")      # the old data file may be one of the sources
    with open(partial, "wb") as out:
        for t in _tensors(proto.graph):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                raw = _read(graph.parent / info["location"], int(info.get("offset", 0)),
                            int(info["length"]) if "length" in info else None)
            elif len(t.raw_data) >= threshold or t.name in shared:
                raw = t.raw_data
            else:
                continue
            if t.name in shared:
                s = shared[t.name]
                if len(raw) != s.length or raw != _read(s.file, s.offset, s.length):
                    raise ExportError(f"{graph.name}: tensor {t.name!r} is not the bytes of {s.location} it should "
                                      "share", t.name)
                _point(t, s.location, s.offset, s.length)
                continue
            del t.external_data[:]
            if len(raw) < threshold:      # small tensors stay inline: shape inference must read them there
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw
                continue
            out.seek(-out.tell() % align, 1)
            offset = out.tell()
            out.write(raw)
            _point(t, data.name, offset, len(raw))
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


def logits_matmuls(graph: onnx.GraphProto, logits: str) -> list[onnx.NodeProto]:
    """The MatMul nodes that compute the `logits` output (the LM head), followed back through Cast / Identity."""
    producer = {o: n for n in graph.node for o in n.output}
    names, found = [logits], []
    while names:
        node = producer.get(names.pop())
        if node is None:
            continue
        if node.op_type == "MatMul":
            found.append(node)
        elif node.op_type in ("Cast", "Identity"):
            names.append(node.input[0])
    return found


def shared_tensors(graph: Path) -> dict[str, Shared]:
    """The initializers of `graph` that point into a file other than its own data file (the shared embedding
    table), as `gather_external_data` takes them for a copy of the graph written elsewhere (a quantized one)."""
    out = {}
    for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and info["location"] != data_file(graph).name:
            out[t.name] = Shared(graph.parent / info["location"], info["location"], int(info.get("offset", 0)),
                                 int(info["length"]))
    return out


# ---- the embedding table ----------------------------------------------------------------------------------

TABLE_DTYPES = {torch.float32: "F32", torch.float16: "F16"}


def write_table(path: Path, table: torch.Tensor, transposed: bool) -> int:
    """Write the embedding table (vocab, hidden; fp32 or fp16, the graphs' dtype) as a one-tensor safetensors file,
    transposed ([hidden, vocab], key `COLUMNS`) when a graph shares it as its LM head, else as rows (key `ROWS`);
    the data starts page-aligned (the header is padded with spaces, as the format allows). Returns the data's
    offset in the file."""
    arr = np.ascontiguousarray((table.t() if transposed else table).detach().cpu().numpy())
    header = json.dumps({COLUMNS if transposed else ROWS: {"dtype": TABLE_DTYPES[table.dtype],
                                                           "shape": list(arr.shape),
                                                           "data_offsets": [0, arr.nbytes]}}).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        arr.tofile(f)
    return 8 + len(header)


class EmbeddingTable:
    """Token embedding lookups in an export's `embeddings.safetensors`, memory-mapped (only the pages read are
    resident): rows of a [vocab, hidden] table, or columns of a transposed one shared with the LM head."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            key = COLUMNS if COLUMNS in header else ROWS
            entry = header[key]
        except (OSError, ValueError, KeyError, struct.error) as e:
            raise ExportError(f"{path} is not an embedding table ({type(e).__name__}: {e})", str(path)) from e
        if entry["dtype"] not in ("F32", "F16") or len(entry["shape"]) != 2:
            raise ExportError(f"{path}: embedding table {entry['dtype']} {entry['shape']}, expected 2-D F32 or F16",
                              str(path))
        start, _ = entry["data_offsets"]
        dtype = np.float32 if entry["dtype"] == "F32" else np.float16
        # copy-on-write ("c"): a writable view torch can wrap (nothing writes it; the pages stay the file's)
        self.table = np.memmap(path, dtype, "c", offset=8 + n + start, shape=tuple(entry["shape"]))
        self._torch = torch.from_numpy(self.table)          # the same pages: torch's gather is ~3x cheaper
        self.transposed = key == COLUMNS
        self.vocab_size = self.table.shape[1] if self.transposed else self.table.shape[0]

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden), in the table's dtype (the graphs')."""
        ids = input_ids.reshape(-1)
        t = self._torch
        rows = t.index_select(1, ids).T if self.transposed else t.index_select(0, ids)
        return rows.contiguous().reshape(*input_ids.shape, -1)
