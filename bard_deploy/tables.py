"""The human tables of the CLI, built from the library's results (the CLI only prints them).

Each function takes what a library call returned (a bench result, a manifest, decoding statistics, a summary
mapping) and returns a rich Table; none computes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich.table import Table

from bard_deploy import iospec
from bard_deploy.manifest import MANIFEST, Manifest
from bard_deploy.onnx_files import graph_bytes

BENCH_COLUMNS = ("configuration", "B", "tau", "EM", "TTFT ms", "step ms p50/p90/p99", "backend / host ms",
                 "steps/blk", "tok/fwd", "NFE/tok", "decode tok/s", "e2e tok/s", "prefill ms", "vision ms", "peak MB",
                 "speed-up")


def mapping_table(title: str, rows: Mapping[str, object]) -> Table:
    """Two columns, key and value, no header."""
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), str(value))
    return table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    return table


def bench_table(result: dict) -> Table:
    """`bard-deploy bench`: one row per configuration, the settings in the title."""
    h = result["header"]
    where = f"{h['gpu']} ({h['device']})" if h["gpu"] else h["machine"]
    requests = result["rows"][0]["requests"] if result["rows"] else 0
    th = h.get("threads") or {}
    variant = f" {h['variant']}" if h.get("variant") else ""
    repeats = f", median of {h['repeats']} repeats" if h.get("repeats", 1) > 1 else ""
    table = _table(f"{h['backend']}{variant} on {where} ({h['cores']} cores; threads: {th.get('backend')} backend, "
                   f"{th.get('host')} host), {h['date']}, batch 1, {requests} requests{repeats}", BENCH_COLUMNS)
    for r in result["rows"]:
        steps = ("-" if r["step_ms_p50"] is None else
                 f"{r['step_ms_p50']:.2f}/{r['step_ms_p90']:.2f}/{r['step_ms_p99']:.2f}")
        split = ("-" if r.get("backend_ms_per_step") is None else
                 f"{r['backend_ms_per_step']:.2f} / {r['host_ms_per_step']:.2f}")
        speed = f"{r['speedup_decode_vs_ar']:.2f}x"
        if "repeats" in r:
            sp = r["repeats"]["speedup_decode_vs_ar"]
            speed += f" ({min(sp):.2f}-{max(sp):.2f})"
        name = r["name"]
        if "mean_accepted" in r:        # speculative: draft tokens kept per round, answers equal to AR's / causal
            same = (f"= AR {r['identical_to_ar']}" if "identical_to_ar" in r else
                    f"= causal {r.get('identical_to_causal', '?')}, {r.get('speedup_decode_vs_causal', 0):.2f}x it")
            name += (f" (kept {r['mean_accepted']:.2f}/round, draft {r['draft_ms_per_round']:.1f} + verify "
                     f"{r['verify_ms_per_round']:.1f} ms, {same})")
        table.add_row(name, str(r["block_size"] or "-"), str(r["threshold"] or "-"),
                      f"{100 * r['exact_match']:.1f}%", f"{r['ttft_ms']:.1f}", steps, split,
                      str(r["steps_per_block"] or "-"), f"{r['tokens_per_forward']:.2f}", f"{r['nfe_per_token']:.2f}",
                      f"{r['decode_tokens_per_s']:.0f}", f"{r['e2e_tokens_per_s']:.0f}", f"{r['prefill_ms']:.1f}",
                      f"{r['vision_ms']:.1f}", f"{r['peak_rss_mb']:.0f}", speed)
    return table


def step_table(result: dict) -> Table:
    """`bard-deploy bench-step`: one row per backend and tokens per step."""
    table = _table(f"decoder step, {result['shape']} ({result['note']})",
                   ("backend", "T", "ms/step", "ms/token", "cost vs T=1", "weights GB/s", "note"))
    for r in result["rows"]:
        table.add_row(r["backend"], str(r["T"]), f"{r['ms_per_step']:.1f}", f"{r['ms_per_token']:.2f}",
                      "-" if r["cost_vs_T1"] is None else f"{r['cost_vs_T1']:.2f}x",
                      "-" if r["weight_GBps"] is None else f"{r['weight_GBps']:.1f}",
                      "" if r["reliable"] else "unreliable: timing noise swamped the layer slope")
    return table


def loop_table(result: dict) -> Table:
    """`bench-step --loop`: the decode loop's step against the bare graph's, per variant, layers and T."""
    table = _table(f"the loop's step vs the bare graph, {result['shape']} (median ms)",
                   ("backend", "layers", "T", "past", "bare", "loop", "loop overhead"))
    for r in result["loop"]:
        table.add_row(r["backend"], str(r["layers"]), str(r["T"]), str(r["past"]), f"{r['bare_ms']:.2f}",
                      f"{r['loop_ms']:.2f}", f"{100 * r['loop_over_bare']:+.1f} %")
    return table


def replay_table(result: dict) -> Table:
    """`bench-step --replay`: AR against BARD replayed through the loop at a real shape."""
    table = _table(result["replay_note"], ("backend", "side", "requests", "tokens", "steps", "tokens/step",
                                          "step p50 ms", "decode tok/s", "speed-up", "AR weights GB/s"))
    for r in result["replay"]:
        for side in ("ar", "bard", "spec"):
            if side not in r:
                continue
            x = r[side]
            label = {"ar": "AR", "bard": f"BARD B{r['block_size']} tau {r['threshold']}",
                     "spec": f"SPEC (lossless) B{r['block_size']} tau {r['threshold']}"}[side]
            speed = {"bard": r["speedup_decode_vs_ar"], "spec": r.get("spec_speedup_decode_vs_ar")}.get(side)
            table.add_row(r["backend"], label, str(x["requests"]), str(x["tokens"]), str(x["steps"]),
                          f"{x['tokens_per_step']:.2f}", f"{x['step_ms_p50']:.1f}", f"{x['decode_tokens_per_s']:.2f}",
                          f"{speed:.2f}x" if speed is not None else "",
                          f"{r.get('ar_weight_GBps', '-')}" if side == "ar" else "")
    return table


def _size(path: Path) -> str:
    """A graph's size with its external data (`<graph>.data`), or a file's size."""
    return f"{graph_bytes(path) / 2**20:.2f} MiB" if path.is_file() else "missing"


def _end_to_end(g: dict, variant: str) -> str:
    """The gate's end-to-end score: exact match fp32 -> quantized (synthetic task) or token agreement (user data)."""
    if "token_agreement" in g:
        return f"generated-token agreement with fp32 {g['token_agreement']:.3f} on {g['eval_samples']} prompts"
    return f"exact match {g['exact_match_fp32']:.3f} -> {g[f'exact_match_{variant}']:.3f}"


def _gate_row(m: Manifest, variant: str) -> str:
    g = getattr(m, variant)
    return (f"{g['scheme']}; top-1 {g['top1_agreement']:.4f} on {g['held_out_steps']} held-out steps; "
            f"{_end_to_end(g, variant)} ({g['attempt']})")


def export_table(m: Manifest, directory: Path) -> Table:
    """`bard-deploy export` / `inspect EXPORT_DIR`: every graph with its size and what checked it."""
    table = _table(f"export {directory}", ("graph", "size", "check"))
    p = m.parity
    table.add_row(m.graphs["decoder"][m.base_variant], _size(directory / m.graphs["decoder"][m.base_variant]),
                  f"max |ONNX - torch| logits {p['decoder'][iospec.LOGITS]:.2e} over {p['steps']} real steps "
                  f"(tol {p['tolerance']:g})")
    if m.vision is not None:
        table.add_row(m.vision.graph, _size(directory / m.vision.graph),
                      f"max diff {max(p['vision'].values()):.2e} over grids "
                      f"{m.vision.validated_grids or [m.vision.grid_thw]} (any grid)")
    for variant in ("int8", "int4"):
        if getattr(m, variant) is not None:
            table.add_row(m.graphs["decoder"][variant], _size(directory / m.graphs["decoder"][variant]),
                          _gate_row(m, variant))
    table.add_row(m.embeddings, _size(directory / m.embeddings), "")
    return table


def runtime_table(m: Manifest, directory: Path) -> Table:
    """What a deployment copies for each decoder variant (`Manifest.runtime_files`): the files, their size, and
    whether this directory holds them all (a bundle may be trimmed to one variant's files)."""
    table = _table("run-time files per variant (copy these to deploy)", ("variant", "files", "size", "here"))
    for variant in m.variants:
        names = [MANIFEST] + m.runtime_files(variant)
        missing = [n for n in names if not (directory / n).is_file()]
        size = sum((directory / n).stat().st_size for n in names if n not in missing)
        table.add_row(variant + (" (default)" if variant == m.default_variant else ""), ", ".join(names),
                      f"{size / 2**20:.2f} MiB", "complete" if not missing else f"missing {', '.join(missing)}")
    return table


def export_summary(m: Manifest, verified: bool = True) -> dict[str, object]:
    """The facts of an export beside its graph table (`inspect EXPORT_DIR`); `verified`: its files were checked
    against the manifest (False right after the exporter wrote them)."""
    kind = "AR" if m.block_size is None else f"BARD, block size {m.block_size}, mask id {m.mask_token_id}"
    out: dict[str, object] = {
        "model": m.model, "kind": kind,
        "decoder": f"{m.num_layers} layers, hidden {m.hidden_size}, {m.num_kv_heads} kv heads x {m.head_dim}, "
                   f"vocab {m.vocab_size}",
        "variants": ", ".join(f"{v}{' (default)' if v == m.default_variant else ''}" for v in m.variants),
        "vision": "none" if m.vision is None else (f"any image size (validated at grids {m.vision.validated_grids})"
                                                   if m.vision.validated_grids else
                                                   f"{m.vision.image_size} px only, grid {m.vision.grid_thw}"),
        "parity": f"{m.parity['steps']} trajectory steps, tolerance {m.parity['tolerance']:g}",
        "exporter": m.exporter,
    }
    for variant in ("int8", "int4"):
        g = getattr(m, variant)
        if g is not None:
            out[f"{variant} gate"] = (f"{'passed' if g['passed'] else 'FAILED'} ({g['attempt']}): top-1 "
                                      f"{g['top1_agreement']} (min {g['thresholds']['top1']}), "
                                      f"{_end_to_end(g, variant)}")
    if m.calibration is not None:
        where = (f"beside the bundle ({m.calibration['file']}; not needed at run time)"
                 if m.calibration.get("where") else f"in the bundle ({m.calibration['file']})")
        out["calibration"] = f"{m.calibration['steps']} steps, sha256 {m.calibration['sha256'][:16]}..., {where}"
    out["files"] = f"{len(m.files)} (sha256 {'verified' if verified else 'written'})"
    return out
