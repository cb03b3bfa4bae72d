"""`manifest.json` of an export directory: what the runtimes need to know, and the sha256 of every file.

Written last by the exporter; read first by every runtime, which refuses a directory whose files are missing,
extra or changed before any graph is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bard_deploy.errors import ExportError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path, body: dict) -> dict:
    files = {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"format_version": FORMAT_VERSION, **body, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    """The manifest, after checking every listed file's hash and that no unlisted file was added."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise ExportError(f"{directory} is not an export directory (no {MANIFEST})", str(directory))
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path} is not a valid manifest ({e})", str(path)) from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}",
                          manifest.get("format_version"))
    for name, digest in files.items():
        f = directory / name
        if not f.is_file():
            raise ExportError(f"export file {name} listed in the manifest is missing", name)
        if sha256(f) != digest:
            raise ExportError(f"export file {name} does not match its sha256 in the manifest (tampered or corrupt)",
                              name)
    extra = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in files and p.name != MANIFEST)
    if extra:
        raise ExportError(f"export directory has a file the manifest does not list: {extra[0]}", extra[0])
    return manifest
