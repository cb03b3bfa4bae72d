"""Summaries of checkpoint and export directories for `bard-deploy inspect` (headers and manifests only: no
tensor is loaded)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

from bard_deploy.checkpoint import SIDE_FILES, tensor_shapes, to_ours, weight_files
from bard_deploy.config import load_config
from bard_deploy.errors import CheckpointError
from bard_deploy.manifest import Manifest, is_export
from bard_deploy.tables import export_summary, export_table, mapping_table, runtime_table


def _count(shapes: dict, arch: str, prefix: str) -> int:
    total = 0
    for key, (shape, _) in shapes.items():
        name = to_ours(key, arch) or ""
        if name.startswith(prefix):
            n = 1
            for s in shape:
                n *= s
            total += n
    return total


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n < 1e9 else f"{n / 1e9:.2f} B"


def checkpoint_summary(directory: str | Path) -> dict[str, object]:
    """Architecture, parameter counts per part, weight files and the bard section of a checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory", str(directory))
    cfg = load_config(directory)
    shapes = tensor_shapes(directory)
    t = cfg.text
    files = weight_files(directory)
    out: dict[str, object] = {
        "architecture": cfg.arch,
        "text decoder": (f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, ffn {t.intermediate_size}, "
                         f"heads {t.num_attention_heads}/{t.num_key_value_heads} kv, head_dim {t.head_dim}"),
        "vocabulary": t.vocab_size,
        "rope": f"theta {t.rope_theta:g}, " + (f"MRoPE interleaved {list(t.mrope_section)}"
                                                if t.mrope_section else "1-D"),
        "tied embeddings": t.tie_word_embeddings,
        "parameters (text)": _millions(_count(shapes, cfg.arch, "model.language_model.")
                                       + _count(shapes, cfg.arch, "lm_head.")),
    }
    if cfg.vision:
        v = cfg.vision
        out["vision tower"] = (f"depth {v.get('depth')}, hidden {v.get('hidden_size')}, patch {v.get('patch_size')}, "
                               f"merge {v.get('spatial_merge_size')}, deepstack {v.get('deepstack_visual_indexes')}")
        out["parameters (vision)"] = _millions(_count(shapes, cfg.arch, "model.visual."))
    dtypes = sorted({d for _, d in shapes.values()})
    out["dtypes"] = ", ".join(dtypes)
    out["weight files"] = f"{len(files)} ({sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)"
    out["tokenizer / processor files"] = ", ".join(n for n in SIDE_FILES if (directory / n).is_file()) or "none"
    if cfg.bard is None:
        out["bard"] = "none (an autoregressive source model)"
    else:
        b = cfg.bard
        out["bard"] = (f"mask id {b.mask_token_id}, block size {b.block_size}, prompt attention {b.prompt_attention}, "
                       f"noise {b.noise}")
        out["provenance"] = f"source {b.source_model}, stage {b.stage}, parent {b.parent}, data {b.data_hash}"
    return out


def inspect_tables(directory: str | Path) -> list[Table]:
    """The tables `bard-deploy inspect` prints: an export's facts and graphs (after verifying its files), or a
    checkpoint's summary."""
    directory = Path(directory)
    if is_export(directory):
        m = Manifest.read(directory, verify=False)
        m.verify_files(directory, needed=[])          # what is here is intact; a trimmed bundle is shown as such
        return export_tables(m, directory, verified=True) + [runtime_table(m, directory)]
    return [mapping_table(f"checkpoint {directory}", checkpoint_summary(directory))]


def export_tables(m: Manifest, directory: Path, verified: bool) -> list[Table]:
    """An export's facts and graphs from its manifest: one read back and verified, or the exporter's own."""
    return [mapping_table(f"export {directory}", export_summary(m, verified)), export_table(m, directory)]
