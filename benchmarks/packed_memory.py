"""Peak memory of one training step: the packed layout [prompt | clean | noisy] vs a naive layout that stores
the prompt twice ([prompt | clean] and [prompt | noisy] as two sequences), at a long sequence.

    python benchmarks/packed_memory.py [--prompt 2048] [--response 256] [--hidden 512] [--layers 8]

Each layout runs in its own subprocess (peak RSS is per process); prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def step(layout: str, prompt: int, response: int, hidden: int, layers: int) -> dict:
    import time

    import torch

    from bard_deploy.bench import peak_rss_mb, reset_peak_rss
    from bard_deploy.config import ModelConfig
    from bard_deploy.diffusion.loss import weighted_ce
    from bard_deploy.diffusion.mask import CLEAN, NOISY, PROMPT, Layout, training_mask
    from bard_deploy.vlm import BardVLM

    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"model_type": "qwen3", "vocab_size": 32000, "hidden_size": hidden,
                                 "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
                                 "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": hidden // 8,
                                 "max_position_embeddings": 16384, "tie_word_embeddings": True})
    model = BardVLM(cfg)
    P, R, B = prompt, response, 16
    blocks = torch.arange(R) // B
    if layout == "packed":
        kind = torch.cat([torch.full((P,), PROMPT), torch.full((R,), CLEAN), torch.full((R,), NOISY)])[None]
        block = torch.cat([torch.zeros(P, dtype=torch.long), blocks, blocks])[None]
        index = torch.cat([torch.arange(P), torch.arange(P, P + R), torch.arange(P, P + R)])[None]
    else:  # the prompt stored twice: [prompt | clean] for the context, [prompt | noisy] for the loss
        kind = torch.stack([torch.cat([torch.full((P,), PROMPT), torch.full((R,), CLEAN)]),
                            torch.cat([torch.full((P,), PROMPT), torch.full((R,), NOISY)])])
        block = torch.cat([torch.zeros(P, dtype=torch.long), blocks]).expand(2, -1)
        index = torch.arange(P + R).expand(2, -1)
    lay = Layout(kind, block, index)
    ids = torch.randint(0, 32000, kind.shape)
    pos = index.unsqueeze(0).expand(3, -1, -1)
    noisy = kind == NOISY
    reset_peak_rss()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    h = model(ids, pos, training_mask(lay), None, None)
    loss, _ = weighted_ce(model, h, ids, noisy, torch.full(ids.shape, 0.5), noisy, 20.0)
    loss.sum().backward()
    return {"layout": layout, "tokens": int(kind.numel()), "peak_rss_mb": round(peak_rss_mb(), 1),
            "step_peak_over_start_mb": round(peak_rss_mb() - base, 1), "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(step(a.child, a.prompt, a.response, a.hidden, a.layers)))
        return
    rows = []
    for layout in ("packed", "naive"):
        out = subprocess.run([sys.executable, __file__, "--child", layout, "--prompt", str(a.prompt), "--response",
                              str(a.response), "--hidden", str(a.hidden), "--layers", str(a.layers)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        print(f"{r['layout']:>7}: {r['tokens']:6d} tokens, step peak +{r['step_peak_over_start_mb']:8.1f} MB "
              f"(process peak {r['peak_rss_mb']:.0f} MB), {r['seconds']} s")
    print(json.dumps({"prompt": a.prompt, "response": a.response, "hidden": a.hidden, "layers": a.layers,
                      "rows": rows, "naive_over_packed": round(rows[1]["step_peak_over_start_mb"]
                                                               / rows[0]["step_peak_over_start_mb"], 2)}))


if __name__ == "__main__":
    main()
