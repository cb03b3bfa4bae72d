"""Noise prior x token revision, on BARD checkpoints of the embedded default (issue: mixed noise and revision
must earn their place).

Two measurements per checkpoint (three with --per-prompt), on the synthetic test prompts:

1. Decoding (torch, batch 1, greedy): exact match, tokens per forward and edits per block at each commit
   threshold x revision setting (`edit_threshold` off / 0.5 / 0.7 / 0.9; refused on a mask-noise checkpoint and
   on a mix one trained with mix_keep_weight 0, whose measured rows, before the refusal, are in the README).
2. The planted canvas, what revision is for: each response block holds the reference answer with a fraction
   `--plant` of its tokens replaced by random text tokens (no MASK left), the blocks before it clean, as a
   block looks to the decoder once every position is committed and some are wrong. One forward; at each edit
   threshold, of the planted (wrong) tokens the share the model would fix (its prediction is the reference
   token, at that confidence), and of the right tokens the share it would break (another prediction at that
   confidence). A model revision helps fixes many and breaks none.
3. With --per-prompt, each prompt's outcome with revision off and on (from the same decoding, batch 1): how many
   answers revision turned right (fixed_vs_off) and wrong (broken_vs_off) at each threshold, which the exact-match
   difference alone hides.

    python benchmarks/revision_ablation.py --model mask=runs/s0/b16 --model mix=runs/s0-mix/b16 --threads 1

Prints one JSON line per checkpoint.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

EDITS = (None, 0.5, 0.7, 0.9)


def planted_canvas(pipe, n: int, plant: float, edit_thresholds, seed: int = 0) -> dict:
    """Fix and break rates of one revision pass over planted blocks (module docstring, 2), with the model, prompt
    encoder and tokenizer of a torch-backend Pipeline."""
    import torch

    from bard_deploy.data.chat import encode_example
    from bard_deploy.data.collate import collate_diffusion
    from bard_deploy.data.synthetic import samples
    from bard_deploy.diffusion.mask import NOISY, training_mask
    from bard_deploy.train.objective import text_token_ids
    from bard_deploy.vlm import greedy_head

    model, encoder, tok = pipe.backend.model, pipe.encoder, pipe.tokenizer
    cfg, bard = model.config, model.config.bard
    text = text_token_ids(tok)
    gen = torch.Generator().manual_seed(seed)
    counts = {t: {"fixed": 0, "broken": 0} for t in edit_thresholds}
    planted_n = right_n = 0
    for s in samples("test", n):
        ex = encode_example(encoder, s.messages(), 256)
        b = collate_diffusion([ex], cfg, bard.block_size, tok.pad_token_id, tok.eos_token_id, bard.prompt_attention)
        noisy = b.layout.kind == NOISY
        target = b.input_ids
        swap = noisy & (torch.rand(target.shape, generator=gen) < plant)
        repl = text[torch.randint(len(text), target.shape, generator=gen)]
        swap &= repl != target
        ids = torch.where(swap, repl, target)
        with torch.no_grad():
            h = model(ids, b.position_ids, training_mask(b.layout, bard.prompt_attention), b.pixel_values,
                      b.image_grid_thw)
            pred, conf = greedy_head(model.head(h[noisy]), bard.mask_token_id)     # the decode loop's rule
        tgt, planted = target[noisy], swap[noisy]
        planted_n += int(planted.sum())
        right_n += int((~planted).sum())
        for t in edit_thresholds:
            sure = conf >= t
            counts[t]["fixed"] += int((planted & sure & (pred == tgt)).sum())
            counts[t]["broken"] += int((~planted & sure & (pred != tgt)).sum())
    return {"plant": plant, "planted": planted_n, "right": right_n,
            **{f"edit {t}": {"fix_rate": round(c["fixed"] / max(planted_n, 1), 4),
                             "break_rate": round(c["broken"] / max(right_n, 1), 4)} for t, c in counts.items()}}


def edit_setting(ap: argparse.ArgumentParser, text: str) -> float | None:
    """One --edits entry: None for 'off', else an edit threshold in (0, 1]; anything else is a usage error."""
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0.0 < value <= 1.0:
        ap.error(f"--edits: {text!r} is neither 'off' nor a threshold in (0, 1]")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="LABEL=CHECKPOINT_DIR (repeatable)")
    ap.add_argument("--samples", type=int, default=1000, help="test prompts (200 carry about +-1.5 points of "
                    "sampling error, 1 000 about +-0.7)")
    ap.add_argument("--thresholds", default="0.9,0.7,0.5", help="commit thresholds of the decoding rows")
    ap.add_argument("--edits", default="off,0.5,0.7,0.9",
                    help="revision settings of the decoding rows: 'off' and/or edit thresholds")
    ap.add_argument("--per-prompt", action="store_true",
                    help="count, prompt by prompt, the answers revision turned right (fixed) and wrong "
                         "(broken) against revision off at each threshold (adds 'off' to --edits if absent)")
    ap.add_argument("--plant", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    from bard_deploy.data.synthetic import samples
    from bard_deploy.errors import RuntimeInputError
    from bard_deploy.evaluate import evaluate
    from bard_deploy.runtimes.api import Pipeline

    edits = [edit_setting(ap, e.strip()) for e in a.edits.split(",")]
    if a.per_prompt and None not in edits:
        edits.insert(0, None)                            # revision's fixes and breaks are counted against off
    torch.set_num_threads(a.threads)
    convs = [s.messages() for s in samples("test", a.samples)]
    # --per-prompt: one group label per prompt, so evaluate's per-group tally is each prompt's outcome
    labels = [str(i) for i in range(len(convs))] if a.per_prompt else None
    for spec in a.model:
        label, _, path = spec.partition("=")
        pipe = Pipeline.load(Path(path), backend="torch", threads=a.threads)
        rows = []
        for tau in (float(x) for x in a.thresholds.split(",")):
            right = {}                                   # --per-prompt: edit setting -> each prompt's outcome
            for edit in edits:
                try:
                    ev = evaluate(pipe, convs, batch_size=1, threshold=tau, edit_threshold=edit, max_new_tokens=64,
                                  groups=labels)
                except RuntimeInputError as e:   # revision the checkpoint was not trained for is refused
                    rows.append({"threshold": tau, "edit_threshold": edit, "refused": str(e)})
                    continue
                rows.append({"threshold": tau, "edit_threshold": edit, "exact_match": ev.exact_match,
                             "tokens_per_forward": round(ev.tokens_per_forward, 3),
                             "edits_per_block": ev.as_dict()["edits_per_block"]})
                if labels is not None:
                    right[edit] = [ev.per_group[g][0] == 1 for g in labels]
            for row in rows:                             # this tau's decoded revision rows, against off
                if labels is not None and row["threshold"] == tau and row["edit_threshold"] in right.keys() - {None}:
                    pairs = list(zip(right[None], right[row["edit_threshold"]], strict=True))
                    row["fixed_vs_off"] = sum(b < n for b, n in pairs)
                    row["broken_vs_off"] = sum(b > n for b, n in pairs)
        print(json.dumps({"model": label, "path": path, "noise": pipe.config.bard.noise, "decode": rows,
                          "planted_canvas": planted_canvas(pipe, a.samples, a.plant, EDITS[1:])}), flush=True)


if __name__ == "__main__":
    main()
