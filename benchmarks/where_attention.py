"""Why an AR source answers "where is the X?" wrongly on a crowded picture: where its attention goes.

    python benchmarks/where_attention.py --model runs/source [--samples 1500]

For every "where" question on a picture of 3 or 4 objects among the first N test samples, the model answers
(greedy, AR) and then reads the reference answer teacher-forced; at the position whose logits pick the place
word ("... is at the |top right"), each language-model head's attention is split into the mass on the asked
object's image token ("target") and on the other objects' tokens. Printed as one JSON line: passes and
failures, per (layer, head) the mean target / other mass of each, how often a same-coloured or same-shaped
other object is present in each group, and whose cell a wrong answer names. Reads the attention through the
explicit MatMul + Softmax path (`use_sdpa = False`, the exporters' form), so nothing in the model changes.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="an AR source checkpoint directory")
    ap.add_argument("--samples", type=int, default=1500, help="test samples scanned for crowded 'where'")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    from bard_deploy.checkpoint import load_model
    from bard_deploy.data.chat import encode_example
    from bard_deploy.data.collate import collate_ar
    from bard_deploy.data.synthetic import PLACES, samples
    from bard_deploy.diffusion.mask import training_mask
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.train.run import load_encoder

    torch.set_num_threads(a.threads)
    model = load_model(a.model).eval()
    cfg = model.config
    encoder = load_encoder(a.model, cfg)
    tok = encoder.tokenizer
    pipe = Pipeline.load(a.model, threads=a.threads)
    lm = model.language_model
    lm.use_sdpa = False
    n_layers, n_heads = len(lm.layers), cfg.text.num_attention_heads
    probs: list[torch.Tensor] = []
    softmax = torch.softmax

    def recording_softmax(x, dim=-1, **kw):
        y = softmax(x, dim=dim, **kw)
        probs.append(y.detach())
        return y

    mass = defaultdict(lambda: torch.zeros(2))          # (passed, layer, head) -> summed (target, other)
    groups, present, answered = Counter(), Counter(), Counter()
    for s in samples("test", a.samples):
        if s.task != "where" or len(s.items) < 3:
            continue
        got = pipe.generate_batch([s.messages()[:-1]], ar=True, max_new_tokens=64)[0].text
        ok = got == s.answer
        target = next(i for i in s.items if i.kind == "shape" and f"the {i.color} {i.name}?" in s.question)
        others = [i for i in s.items if i is not target]
        ex = encode_example(encoder, s.messages(), cfg.text.max_position_embeddings)
        batch = collate_ar([ex], cfg, tok.pad_token_id)
        ids = batch.input_ids[0].tolist()
        image = [j for j, t in enumerate(ids) if t == cfg.image_token_id]          # one per cell, row-major
        words = tok.convert_ids_to_tokens(ex.response_ids)
        at = next(j for j, w in enumerate(words) if w.lower().lstrip("Ġ▁") == "at")
        query = len(ex.prompt_ids) + at + 1            # "the" after "at": its logits predict the place
        probs.clear()
        torch.softmax = recording_softmax
        try:
            with torch.no_grad():
                model(batch.input_ids, batch.position_ids, training_mask(batch.layout, "causal"),
                      batch.pixel_values, batch.image_grid_thw)
        finally:
            torch.softmax = softmax
        for layer, p in enumerate(probs[-n_layers:]):                            # the LM's layers, in order
            row = p[0, :, query]                                                  # (heads, keys)
            for h in range(n_heads):
                mass[(ok, layer, h)] += torch.stack([row[h, image[target.cell]],
                                                     sum(row[h, image[o.cell]] for o in others)])
        group = "passed" if ok else "failed"
        groups[group] += 1
        present[f"{group}: a same-coloured other object"] += any(o.color == target.color for o in others)
        present[f"{group}: a same-shaped other object"] += any(o.kind == "shape" and o.name == target.name
                                                               for o in others)
        place = got.split(" at the ")[-1].split(" of the")[0] if " at the " in got else None
        if not ok:
            cell = PLACES.index(place) if place in PLACES else None
            hit = next((o for o in others if o.cell == cell), None)
            answered["unreadable" if cell is None else "an empty cell" if hit is None else
                     "a same-coloured object's cell" if hit.color == target.color else
                     "a same-shaped object's cell" if hit.kind == "shape" and hit.name == target.name else
                     "another object's cell"] += 1
    heads = {f"layer {layer} head {h}": {g: [round(float(v), 3) for v in mass[(ok, layer, h)] / max(1, groups[g])]
                                         for ok, g in ((True, "passed"), (False, "failed"))}
             for layer in range(n_layers) for h in range(n_heads)}
    print(json.dumps({"model": str(a.model), "crowded_where": dict(groups), "present": dict(present),
                      "wrong_answer_names": dict(answered), "attention_target_other": heads}))


if __name__ == "__main__":
    main()
