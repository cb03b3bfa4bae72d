"""Tiny random models and inputs for the tests (built from configs: no download)."""

from __future__ import annotations

import torch

IMG, VSTART, VEND, VID = 990, 991, 992, 993
VOCAB = 1000
MASK_ID = 999


def qwen3_vl_config(tie: bool = False, layers: int = 4):
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True),
                         pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


def hf_qwen3_vl(tie: bool = False, seed: int = 0):
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(qwen3_vl_config(tie)).eval()
    # Random init leaves q/k norms and RMSNorm weights at 1 and the mask-free paths untested: perturb all.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def hf_qwen3(tie: bool = True, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie,
                      rope_parameters=dict(rope_type="default", rope_theta=1e4))
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def image_inputs(h: int = 64, w: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """pixel_values (patches, 1536), image_grid_thw (1, 3) and the LM token count of one random image,
    patchified as Qwen2VLImageProcessor does (patch 16, temporal patch 2, merge 2)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g)
    ps, tps, ms = 16, 2, 2
    gh, gw = h // ps, w // ps
    frames = img.unsqueeze(0).repeat(tps, 1, 1, 1)
    x = frames.reshape(1, tps, 3, gh // ms, ms, ps, gw // ms, ms, ps).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, 3 * tps * ps * ps), torch.tensor([[1, gh, gw]]), gh * gw // ms**2


def image_prompt(n_img: int, before: list[int], after: list[int]) -> list[int]:
    return before + [VSTART] + [IMG] * n_img + [VEND] + after


def concurrently(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)], each called in its own thread, all at once."""
    import threading

    got = [None] * n

    def work(i):
        got[i] = fn(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def assert_concurrent_equals_sequential(pipe, samples, **options) -> None:
    """Threads calling `pipe.generate` at once get exactly the sequential outputs."""
    seq = [pipe.generate(s.question, images=[s.image()], **options).token_ids for s in samples]
    got = concurrently(lambda i: pipe.generate(samples[i].question, images=[samples[i].image()],
                                               **options).token_ids, len(samples))
    assert got == seq
