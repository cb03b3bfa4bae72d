"""`manifest.json` of an export directory: what the runtimes need to know, and the sha256 of every file.

One frozen dataclass, one writer (`Manifest.write`, called last by the exporter) and one reader (`Manifest.read`,
called first by every runtime), which refuses a directory whose files are missing, extra or changed before any
graph is loaded. `check_config` refuses a manifest that does not describe the config beside it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from bard_deploy import iospec
from bard_deploy.errors import ExportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_export(directory: str | Path) -> bool:
    """True for a directory with a manifest (an export), False for a checkpoint or anything else."""
    return (Path(directory) / MANIFEST).is_file()


def base_variant_of(float_dtype: str) -> str:
    """The name of the unquantized decoder variant of graphs with this float IO dtype: "fp32" or "fp16"."""
    return "fp16" if float_dtype == "float16" else "fp32"


@dataclass(frozen=True)
class VisionGraph:
    """The vision graph of an export: its file, the square image size and the (t, h, w) patch grid it was
    traced at (it takes any grid), its IO table, and the grids the export validated it at against PyTorch."""

    graph: str
    image_size: int
    grid_thw: list[int]
    io: dict | None = None           # absent in exports written before the IO table was recorded
    validated_grids: list[list[int]] | None = None     # absent in exports of one-grid graphs


@dataclass(frozen=True)
class Manifest:
    """Everything the runtimes read from an export directory (JSON keys = field names)."""

    model: str                                  # the checkpoint directory it was exported from
    io: dict                                    # the decoder's IO table (iospec.DecoderIO.table())
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    mask_token_id: int | None                   # None: an AR model
    block_size: int | None
    embeddings: str                             # safetensors file of the token embedding table
    vision: VisionGraph | None
    graphs: dict[str, dict[str, str]]           # {"decoder": {"fp32": "decoder.onnx", "int8": ...}}
    default_variant: str
    tokenizer_files: list[str]
    parity: dict                                # ONNX vs PyTorch: tolerance, steps, worst diff per output
    exporter: str
    int8: dict | None = None                    # the INT8 gate's report (when an INT8 decoder exists)
    int4: dict | None = None                    # the INT4 gate's report (when an INT4 decoder exists)
    calibration: dict | None = None             # file, sha256 and step count of the calibration inputs
    files: dict[str, str] = field(default_factory=dict)   # name -> sha256 of every other file
    format_version: int = FORMAT_VERSION

    @property
    def float_dtype(self) -> str:
        """The graphs' float IO dtype ("float32", or "float16" for an `export --dtype fp16`), from the IO table."""
        return next(dtype for name, dtype, _ in self.io["inputs"] if name == iospec.INPUTS_EMBEDS)

    @property
    def fused_head(self) -> bool:
        """Whether the decoder graphs also return the fused greedy head's outputs (from the IO table)."""
        return any(name == iospec.TOP_IDS for name, _, _ in self.io["outputs"])

    @property
    def base_variant(self) -> str:
        """The unquantized decoder variant: "fp32", or "fp16"."""
        return base_variant_of(self.float_dtype)

    @property
    def variants(self) -> list[str]:
        """The decoder variants of this export ("fp32", "int8")."""
        return list(self.graphs["decoder"])

    def decoder_graph(self, variant: str | None = None) -> tuple[str, str]:
        """(variant, file name) of a decoder variant (default: the manifest's); ExportError if absent."""
        variant = variant or self.default_variant
        graphs = self.graphs["decoder"]
        if variant not in graphs:
            raise ExportError(f"export has no '{variant}' decoder (has: {', '.join(graphs)})", variant)
        return variant, graphs[variant]

    def with_decoder(self, variant: str, graph: str, default: bool = False) -> Manifest:
        """A copy with one more decoder variant (optionally made the default)."""
        graphs = {**self.graphs, "decoder": {**self.graphs["decoder"], variant: graph}}
        return replace(self, graphs=graphs, default_variant=variant if default else self.default_variant)

    def check_config(self, config) -> None:
        """Refuse a manifest that does not describe `config` (the config.json beside it): IO table, model facts."""
        io = iospec.DecoderIO.for_config(config, self.float_dtype, self.fused_head)
        if self.io != io.table():
            raise ExportError("manifest IO table does not match the model config in the export directory", "io")
        b = config.bard
        facts = {"num_layers": io.num_layers, "num_kv_heads": io.num_kv_heads,
                 "mask_token_id": b.mask_token_id if b else None, "block_size": b.block_size if b else None}
        for key, value in facts.items():
            if getattr(self, key) != value:
                raise ExportError(f"manifest {key}={getattr(self, key)!r} does not match the config ({value!r})", key)

    # ---- JSON -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON object (format_version first, files last)."""
        d = asdict(self)
        files = d.pop("files")
        return {"format_version": d.pop("format_version"), **d, "files": files}

    @classmethod
    def from_dict(cls, d: dict, where: str) -> Manifest:
        """Parse a manifest object; a missing or unknown key is an ExportError naming it."""
        if not isinstance(d, dict):
            raise ExportError(f"{where} is not a JSON object", where)
        if d.get("format_version") != FORMAT_VERSION:
            raise ExportError(f"{where}: format_version {d.get('format_version')!r}, expected {FORMAT_VERSION}",
                              d.get("format_version"))
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ExportError(f"{where}: unknown key '{unknown[0]}'", unknown[0])
        try:
            vision = VisionGraph(**d["vision"]) if d.get("vision") else None
            return cls(**{**d, "vision": vision})
        except TypeError as e:
            raise ExportError(f"{where} is not a valid manifest ({e})", where) from e

    def write(self, directory: Path) -> Manifest:
        """Hash every file of `directory`, write manifest.json; returns the manifest with its `files`."""
        files = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
        done = replace(self, files=files)
        (directory / MANIFEST).write_text(json.dumps(done.to_dict(), indent=2) + "\n")
        return done

    def runtime_files(self, variant: str | None = None) -> list[str]:
        """The listed files a runtime needs to decode with one decoder variant (default: the manifest's): every
        file but the other variants' decoder graphs (and their data files) and the calibration inputs. A bundle
        trimmed to these loads and verifies (`inspect` lists them per variant)."""
        variant, graph = self.decoder_graph(variant)
        others = {g for v, g in self.graphs["decoder"].items() if v != variant} - {graph}
        skip = others | {g + ".data" for g in others} | ({self.calibration["file"]} if self.calibration else set())
        return [name for name in self.files if name not in skip]

    @classmethod
    def read(cls, directory: str | Path, verify: bool = True) -> Manifest:
        """The manifest of an export directory; with `verify`, after checking every listed file's hash and
        that no unlisted file was added."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ExportError(f"{directory} is not an export directory (no {MANIFEST})", str(directory))
        try:
            m = cls.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ExportError(f"{path} is not a valid manifest ({e})", str(path)) from e
        if verify:
            m.verify_files(directory)
        return m

    @classmethod
    def for_variant(cls, directory: str | Path, variant: str | None = None) -> Manifest:
        """The manifest of an export directory, verified for decoding with `variant` (default: the manifest's):
        its files present and intact, the other variants' graphs and the calibration inputs optional."""
        m = cls.read(directory, verify=False)
        m.verify_files(Path(directory), m.runtime_files(variant))
        return m

    def verify_files(self, directory: Path, needed: list[str] | None = None) -> None:
        """ExportError unless the directory holds the listed files `needed` (default: all) and the others it
        holds match their hashes too, with nothing unlisted added."""
        needed = set(self.files if needed is None else needed)
        for name, digest in self.files.items():
            f = directory / name
            if not f.is_file():
                if name not in needed:
                    continue                                   # a bundle trimmed to another variant's files
                raise ExportError(f"export file {name} listed in the manifest is missing", name)
            if sha256(f) != digest:
                raise ExportError(f"export file {name} does not match its sha256 in the manifest (tampered or "
                                  "corrupt)", name)
        extra = sorted(p.name for p in directory.iterdir()
                       if p.is_file() and p.name not in self.files and p.name != MANIFEST)
        if extra:
            raise ExportError(f"export directory has a file the manifest does not list: {extra[0]}", extra[0])
