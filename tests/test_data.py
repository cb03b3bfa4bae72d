"""Synthetic task, tokenizer/processor files, chat JSONL pipeline (every bad-row case), packed collate."""

import base64
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bard_deploy.data.chat import Report, encode_example, read_jsonl
from bard_deploy.data.collate import collate_ar, collate_diffusion
from bard_deploy.data.synthetic import SPLITS, make_sample, samples, split_of
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer, save_processing_files
from bard_deploy.diffusion.mask import CLEAN, NOISY, PAD, PROMPT
from bard_deploy.embedded import embedded_config
from bard_deploy.errors import DataError
from bard_deploy.prompting import PromptEncoder, predicted_grid


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def cfg(tok):
    return embedded_config(tok, hidden=64, layers=2)


@pytest.fixture(scope="module")
def encoder(tok, cfg):
    return PromptEncoder(tok, build_image_processor(), cfg.image_token_id, cfg.spatial_merge_size)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ---- the synthetic task ---------------------------------------------------------------------------

def test_generator_is_deterministic():
    for seed in (0, 17, 123456):
        a, b = make_sample(seed), make_sample(seed)
        assert a == b and png_bytes(a.image()) == png_bytes(b.image())
    assert make_sample(1).content_hash != make_sample(2).content_hash


def test_splits_do_not_overlap():
    hashes = {name: {s.content_hash for s in samples(name, 300)} for name in SPLITS}
    assert not hashes["train"] & hashes["test"] and not hashes["train"] & hashes["validation"]
    assert not hashes["validation"] & hashes["test"]
    assert all(split_of(s) == "test" for s in samples("test", 50))


def test_task_weights_change_the_training_mix_only_where_asked():
    """No weights: the samples are what they always were (the test split is fixed); weights shift the mix of
    question types (the split still by content, so no test pair enters training); bad weights are refused."""
    from collections import Counter

    assert list(samples("train", 50, task_weights={})) == list(samples("train", 50))     # {}: the uniform draw
    plain = Counter(s.task for s in samples("train", 800))
    where = Counter(s.task for s in samples("train", 800, task_weights={"where": 3.0}))
    assert where["where"] > 1.5 * plain["where"] and where["describe"] < plain["describe"]
    test_keys = {s.content_hash for s in samples("test", 400)}
    assert not test_keys & {s.content_hash for s in samples("train", 800, task_weights={"where": 3.0})}
    for bad in ({"wheer": 1.0}, {"where": -1.0}):
        with pytest.raises(ValueError, match="task_weights"):
            next(samples("train", 1, task_weights=bad))


def test_object_weights_crowd_the_training_pictures_only_where_asked():
    """Object-count weights shift how many objects the training pictures hold (no weights: the uniform draw,
    the samples unchanged), never move a test pair into training, and bad weights are refused by name."""
    from collections import Counter

    assert list(samples("train", 50, object_weights=None)) == list(samples("train", 50))
    plain = Counter(len(s.items) for s in samples("train", 800))
    crowded = Counter(len(s.items) for s in samples("train", 800, object_weights=(1, 1, 3, 3)))
    assert crowded[4] > 1.25 * plain[4] and crowded[1] < 0.75 * plain[1]  # 3 / 8 and 1 / 8 against 1 / 4
    assert set(Counter(len(s.items) for s in samples("train", 200, object_weights=(0, 0, 0, 1)))) == {4}
    test_keys = {s.content_hash for s in samples("test", 400)}
    assert not test_keys & {s.content_hash for s in samples("train", 800, object_weights=(1, 1, 3, 3))}
    for bad in ((1, 1, 1), (1, -1, 1, 1), (0, 0, 0, 0)):
        with pytest.raises(ValueError, match="object_weights"):
            next(samples("train", 1, object_weights=bad))


def test_color_share_plants_same_coloured_twins_only_where_asked():
    """color_share 0 is the plain draw; 1 makes every shape after the first a same-coloured twin of an earlier
    one in another form (the hard case of "where"); the test split is untouched and a bad rate is refused."""
    assert list(samples("train", 50, color_share=0.0)) == list(samples("train", 50))
    for s in samples("train", 300, color_share=1.0):
        shapes = [i for i in s.items if i.kind == "shape"]
        assert len({i.color for i in shapes}) <= 1                                   # all twins of the first
        assert len(shapes) < 2 or shapes[0].name != shapes[1].name                   # in another form
    test_keys = {s.content_hash for s in samples("test", 400)}
    assert not test_keys & {s.content_hash for s in samples("train", 800, color_share=0.5)}
    with pytest.raises(ValueError, match="color_share"):
        next(samples("train", 1, color_share=1.5))


def test_answers_are_sentences_of_8_to_40_tokens(tok):
    lengths = [len(tok(s.answer)["input_ids"]) for s in samples("train", 500)]
    assert min(lengths) >= 8 and max(lengths) <= 40
    tasks = {s.task for s in samples("train", 200)}
    assert tasks == {"describe", "count", "where", "read"}


def test_tokenizer_and_processor_round_trip(tmp_path, tok):
    save_processing_files(tmp_path)
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = make_sample(3)
    ids = loaded(s.answer)["input_ids"]
    assert loaded.unk_token_id not in ids and loaded.decode(ids) == s.answer
    for special in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|mask|>"):
        assert loaded.convert_tokens_to_ids(special) != loaded.unk_token_id
    proc = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)
    out = proc(images=[s.image()], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 6]]


# ---- chat JSONL ------------------------------------------------------------------------------------

def row(image="img.png", answer="A red circle.", **over):
    msgs = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": answer}]
    return {"messages": msgs, **over}


@pytest.fixture
def data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    make_sample(1).image().save(root / "img.png")
    return root


def read(root, lines, encoder, **kw):
    path = root / "rows.jsonl"
    path.write_text("\n".join(ln if isinstance(ln, str) else json.dumps(ln) for ln in lines) + "\n")
    report = Report()
    return list(read_jsonl(path, encoder, max_len=kw.pop("max_len", 256), report=report, **kw)), report


def test_good_rows_and_multi_turn(data_root, encoder, tok):
    multi = {"messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "image", "image": "img.png"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "Where?"},
        {"role": "assistant", "content": [{"type": "text", "text": "At the top."}]}]}
    examples, report = read(data_root, [row(), multi], encoder)
    assert len(examples) == 2 and not report.skipped
    last = examples[1]
    assert tok.decode(last.response_ids, skip_special_tokens=True) == "At the top."
    assert last.response_ids[-1] == tok.eos_token_id
    assert last.prompt_ids[-2:] == tok("<|im_start|> assistant", add_special_tokens=False)["input_ids"]
    assert examples[0].image_grid_thw.tolist() == [[1, 6, 6]]


def test_base64_image(data_root, encoder):
    uri = "data:image/png;base64," + base64.b64encode((data_root / "img.png").read_bytes()).decode()
    examples, report = read(data_root, [row(image=uri)], encoder)
    assert len(examples) == 1 and not report.skipped


BAD_ROWS = {
    "malformed json": ('{"messages": [', "malformed JSON"),
    "not an object": ("[1, 2]", "object with a 'messages'"),
    "messages wrong type": ({"messages": "hi"}, "'messages' must be a non-empty list"),
    "bad role": ({"messages": [{"role": "bot", "content": "x"}]}, "role 'bot'"),
    "content wrong type": ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]},
                           "content must be a string"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    "trailing user turn": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"},
                                         {"role": "user", "content": "more"}]}, "last message must be the assistant"),
    "empty answer": (row(answer="  "), "assistant turn is empty"),
    "missing image": (row(image="nope.png"), "nope.png not found"),
    "dotdot path": (row(image="../secret.png"), "escapes the data root"),
    "absolute path": (row(image="/etc/passwd"), "is absolute"),
    "corrupt image": (row(image="corrupt.png"), "cannot be decoded"),
    "bad base64": (row(image="data:image/png;base64,%%%"), "invalid base64"),
    "too long": (row(answer=" ".join(["red"] * 300)), "more than max_len"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_are_reported_with_file_and_line(data_root, encoder, case):
    (data_root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    bad, message = BAD_ROWS[case]
    examples, report = read(data_root, [row(), bad, row()], encoder)
    assert len(examples) == 2 and len(report.skipped) == 1
    assert "rows.jsonl:2:" in report.skipped[0] and message in report.skipped[0]
    with pytest.raises(DataError, match="rows.jsonl:2: "):
        read(data_root, [row(), bad], encoder, on_error="fail")


def test_symlink_escaping_the_root_is_refused(data_root, tmp_path, encoder):
    outside = tmp_path / "outside.png"
    make_sample(2).image().save(outside)
    os.symlink(outside, data_root / "link.png")
    _, report = read(data_root, [row(image="link.png")], encoder)
    assert "escapes the data root" in report.skipped[0]


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_image_modes_become_rgb(data_root, encoder, mode):
    img = make_sample(1).image()
    img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
    img.save(data_root / "m.png")
    examples, report = read(data_root, [row(image="m.png")], encoder)
    assert len(examples) == 1, report.skipped


def test_zero_size_and_huge_images(data_root, encoder, monkeypatch):
    import bard_deploy.prompting as prompting
    with pytest.raises(DataError, match="zero size"):
        prompting.load_image(Image.new("RGB", (0, 5)))
    monkeypatch.setattr(prompting, "MAX_IMAGE_PIXELS", 50 * 50)
    _, report = read(data_root, [row()], encoder)
    assert "more than the limit" in report.skipped[0]


# ---- collate ---------------------------------------------------------------------------------------

def test_packed_layout_by_hand(encoder, tok, cfg):
    s = make_sample(5)
    ex = encode_example(encoder, s.messages(), 256)
    P, R = len(ex.prompt_ids), len(ex.response_ids)
    b = collate_diffusion([ex], cfg, block_size=4, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    Rp = -(-R // 4) * 4
    assert b.input_ids.shape == (1, P + 2 * Rp)
    kind, block, index = b.layout.kind[0], b.layout.block[0], b.layout.index[0]
    assert kind.tolist() == [PROMPT] * P + [CLEAN] * Rp + [NOISY] * Rp
    assert block[P:P + Rp].tolist() == [j // 4 for j in range(Rp)] == block[P + Rp:].tolist()
    assert index[P:P + Rp].tolist() == list(range(P, P + Rp)) == index[P + Rp:].tolist()
    resp = b.input_ids[0, P:P + Rp]
    assert resp[:R].tolist() == ex.response_ids and (resp[R:] == tok.eos_token_id).all()
    assert torch.equal(b.input_ids[0, P:P + Rp], b.input_ids[0, P + Rp:])
    pos = b.position_ids[:, 0]
    assert torch.equal(pos[:, P:P + Rp], pos[:, P + Rp:])                     # noisy reuses clean positions
    assert (pos[0, P:P + Rp] == pos[1, P:P + Rp]).all() and (pos[0, P:P + Rp] == pos[2, P:P + Rp]).all()
    img = (b.input_ids[0, :P] == cfg.image_token_id).nonzero().squeeze(1)
    # the 3 x 3 merged image tokens get 2-D positions: rows 1 and 2 run over h and w
    assert pos[1, img].tolist() == [pos[1, img[0]].item() + i // 3 for i in range(9)]
    assert pos[2, img].tolist() == [pos[2, img[0]].item() + i % 3 for i in range(9)]
    assert pos[0, P].item() == pos[0, P - 1].item() + 1                        # text continues after the prompt
    assert b.loss_mask[0].tolist() == [False] * (P + Rp) + [True] * Rp


def test_examples_keep_images_compressed_and_make_the_eager_pixel_values(encoder, tok, cfg, tmp_path):
    s = make_sample(7)
    kept = encode_example(encoder, s.messages(), 256)                           # the default: compressed
    eager = encode_example(encoder, s.messages(), 256, compress_images=False)
    assert isinstance(eager.pixels, torch.Tensor) and kept.pixels.nbytes < eager.pixels.nbytes / 20
    assert torch.equal(kept.pixel_values, eager.pixel_values)                  # bitwise: PNG is lossless
    assert kept.prompt_ids == eager.prompt_ids and torch.equal(kept.image_grid_thw, eager.image_grid_thw)
    # a real RGBA photo-like file from disk goes through the same conversion either way
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    msgs = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "what"}]},
            {"role": "assistant", "content": "a red circle"}]
    a = encode_example(encoder, msgs, 256, image_root=tmp_path)
    b = encode_example(encoder, msgs, 256, image_root=tmp_path, compress_images=False)
    assert torch.equal(a.pixel_values, b.pixel_values)
    batch = collate_diffusion([kept, eager], cfg, block_size=4, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
    assert torch.equal(batch.pixel_values[:36], batch.pixel_values[36:])


@pytest.mark.parametrize("size", [(96, 96), (1, 1), (5, 300), (300, 5), (37, 1001), (640, 480), (3000, 2000)])
def test_compressed_images_predict_the_processor_grid_from_the_size(encoder, size):
    proc = encoder.processor
    img = Image.new("RGB", size, (10, 200, 30))
    want = proc(images=[img], return_tensors="pt")["image_grid_thw"]
    assert torch.equal(predicted_grid(proc, [img]), want)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "what"}]}]
    kept = encoder.encode(msgs, compress_images=True)
    assert torch.equal(kept.image_grid_thw, want)
    assert kept.compressed.pixel_values().shape[0] == int(want.prod())


@pytest.mark.parametrize("compress", [False, True])
def test_an_image_the_processor_refuses_is_a_data_error(encoder, compress):
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (1, 300))},
                                          {"type": "text", "text": "what"}]}]
    with pytest.raises(DataError, match="1x300.*aspect ratio"):
        encoder.encode(msgs, compress_images=compress)


def test_compressed_images_refuse_a_processor_that_makes_another_grid(encoder):
    msgs = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (96, 96))},
                                          {"type": "text", "text": "what"}]}]
    kept = encoder.encode(msgs, compress_images=True).compressed
    from transformers import Qwen2VLImageProcessorPil

    kept.processor = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                              min_pixels=192 * 192, max_pixels=512 * 512)   # other files
    with pytest.raises(DataError, match="grids"):
        kept.pixel_values()


def test_batch_padding_and_ar_layout(encoder, tok, cfg):
    exs = [encode_example(encoder, make_sample(i).messages(), 256) for i in (1, 2, 3)]
    b = collate_diffusion(exs, cfg, block_size=8, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id,
                          prompt_attention="block")
    lengths = [len(e.prompt_ids) + 2 * (-(-len(e.response_ids) // 8) * 8) for e in exs]
    for i, n in enumerate(lengths):
        assert (b.layout.kind[i, n:] == PAD).all() and (b.layout.kind[i, :n] != PAD).all()
        P = len(exs[i].prompt_ids)
        assert b.layout.block[i, :P].tolist() == [j // 8 for j in range(P)]
    assert b.pixel_values.shape[0] == 3 * 36 and b.image_grid_thw.shape == (3, 3)
    a = collate_ar(exs, cfg, tok.pad_token_id)
    P, R = len(exs[0].prompt_ids), len(exs[0].response_ids)
    assert a.loss_mask[0].nonzero().squeeze(1).tolist() == list(range(P - 1, P + R - 1))
    assert (a.layout.kind[0, :P + R] == PROMPT).all()


def test_prompt_positions_are_computed_once_per_example_and_config(encoder, tok, cfg):
    """Collation keeps each example's MRoPE positions under (image token id, merge size): they are rope_index's,
    a second collation reads them back into the same batch, and an entry under another key is not used."""
    from bard_deploy.vision import rope_index

    exs = [encode_example(encoder, make_sample(i).messages(), 256) for i in (4, 5)]
    exs[1].positions[(-1, 2)] = (torch.zeros(3, 1, dtype=torch.long), 0)        # another config's entry
    first = collate_ar(exs, cfg, tok.pad_token_id)
    key = (cfg.image_token_id, cfg.spatial_merge_size)
    assert [set(e.positions) for e in exs] == [{key}, {key, (-1, 2)}]
    for e in exs:
        pos, delta = rope_index(torch.tensor([e.prompt_ids]), cfg.image_token_id, e.image_grid_thw,
                                cfg.spatial_merge_size)
        assert torch.equal(e.positions[key][0], pos[:, 0]) and e.positions[key][1] == int(delta[0])
    assert torch.equal(collate_ar(exs, cfg, tok.pad_token_id).position_ids, first.position_ids)


def test_video_processor_follows_qwen3_vl_video_processing(tmp_path):
    """Frames -> patches as Qwen3-VL's video processor makes them: one size for every frame from its smart_resize
    over the budget of all frames, pairs of frames per temporal patch (an odd count repeats the last frame), and a
    still image given as two equal frames gives exactly the image processor's patches (the same normalisation and
    patch order); video_preprocessor_config.json, when there is one, sets the budget."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    from bard_deploy.video import VideoInput, VideoProcessor

    proc = build_image_processor()
    rng = np.random.default_rng(0)
    frames = [Image.fromarray((rng.random((480, 640, 3)) * 255).astype("uint8")) for _ in range(8)]
    vp = VideoProcessor.for_directory(tmp_path, proc)                     # transformers' Qwen3-VL defaults
    assert (vp.min_pixels, vp.max_pixels) == (128 * 32 * 32, 768 * 32 * 32)
    ev = vp(VideoInput(tuple(frames), 2.0))
    rh, rw = smart_resize(8, 480, 640, 2, 32, vp.min_pixels, vp.max_pixels)
    assert ev.grid == [4, rh // 16, rw // 16] and 4 * rh * rw <= vp.max_pixels < 8 * 480 * 640
    assert ev.pixel_values.shape == (4 * rh * rw // 256, 3 * 2 * 16 * 16)
    small = VideoProcessor(16, 2, 2, 1024, 10 ** 6, proc.image_mean, proc.image_std)     # budget not binding
    clip = [Image.fromarray((rng.random((64, 96, 3)) * 255).astype("uint8")) for _ in range(5)]
    odd = small(VideoInput(tuple(clip), 2.0))
    padded = small(VideoInput(tuple(clip + clip[4:]), 2.0))
    assert odd.grid == [3, 4, 6] and torch.equal(odd.pixel_values, padded.pixel_values)
    assert vp.timestamps(5, 2.0) == [0.25, 1.25, 2.0]
    still = clip[0]
    want = proc(images=[still], return_tensors="pt")
    assert want["image_grid_thw"].tolist() == [[1, 4, 6]]
    got = small(VideoInput((still, still), 2.0))
    assert got.grid == [1, 4, 6] and torch.allclose(got.pixel_values, want["pixel_values"], atol=1e-6)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 4096, "longest_edge": 65536}, "max_frames": 16}))
    vp = VideoProcessor.for_directory(tmp_path, proc)
    assert (vp.min_pixels, vp.max_pixels, vp.max_frames) == (4096, 65536, 16)
    assert np.prod(vp(VideoInput(tuple(frames), 2.0)).grid) * 256 <= 65536
