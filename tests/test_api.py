"""The Python API and `bard-deploy generate` on a complete tiny checkpoint (tokenizer and processor included)."""

import threading

import pytest

from bard_deploy.cli import main
from bard_deploy.data.synthetic import make_sample
from bard_deploy.embedded import new_checkpoint
from bard_deploy.errors import CheckpointError, RuntimeInputError
from bard_deploy.runtimes.api import Pipeline
from tiny import assert_concurrent_equals_sequential

SIZES = dict(hidden=64, layers=2)


@pytest.fixture(scope="module")
def bard_dir(tmp_path_factory):
    return new_checkpoint(tmp_path_factory.mktemp("ck") / "b4", bard={"block_size": 4}, **SIZES)


@pytest.fixture(scope="module")
def pipe(bard_dir):
    return Pipeline.load(bard_dir)


def test_generate_and_stream_agree(pipe):
    s = make_sample(7)
    r = pipe.generate(s.question, images=[s.image()], max_new_tokens=12)
    assert len(r.token_ids) == 12 and r.stats.nfe == 1 + sum(r.stats.steps_per_block)
    pieces = list(pipe.stream(s.question, images=[s.image()], max_new_tokens=12))
    assert len(pieces) >= 2 and "".join(pieces) == r.text


def test_messages_equal_prompt_plus_images(pipe):
    s = make_sample(11)
    a = pipe.generate(s.question, images=[s.image()], max_new_tokens=8)
    b = pipe.generate(messages=s.messages()[:1], max_new_tokens=8)
    assert a.token_ids == b.token_ids


def test_prompt_and_messages_are_checked(pipe):
    s = make_sample(0)
    with pytest.raises(RuntimeInputError, match="prompt must be a string, got list"):
        pipe.generate(s.messages()[:-1])                 # a conversation passed as the prompt
    with pytest.raises(RuntimeInputError, match="exactly one of prompt and messages"):
        pipe.generate(s.question, messages=s.messages()[:-1])


def test_concurrent_calls_equal_sequential(pipe):
    assert_concurrent_equals_sequential(pipe, [make_sample(i) for i in range(6)], max_new_tokens=8, threshold=0.5)


def test_batch_rows_equal_single_calls(pipe):
    samples = [make_sample(i) for i in (1, 2, 3)]
    single = [pipe.generate(s.question, images=[s.image()], max_new_tokens=8).token_ids for s in samples]
    batch = pipe.generate_batch([s.messages()[:1] for s in samples], max_new_tokens=8)
    assert [r.token_ids for r in batch] == single


def test_mode_must_match_the_checkpoint(pipe, tmp_path):
    with pytest.raises(RuntimeInputError, match="BARD checkpoint"):
        pipe.generate("Describe the picture.", ar=True)
    ar = Pipeline.load(new_checkpoint(tmp_path / "ar", **SIZES))
    with pytest.raises(RuntimeInputError, match="ar=True"):
        ar.generate("Describe the picture.")
    assert len(ar.generate("Describe the picture.", ar=True, max_new_tokens=5).token_ids) == 5


def test_tokenizer_larger_than_vocabulary_is_refused(tmp_path):
    import json
    d = new_checkpoint(tmp_path / "c", **SIZES)
    cfg = json.loads((d / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    w = load_file(d / "model.safetensors")
    w["model.language_model.embed_tokens.weight"] = w["model.language_model.embed_tokens.weight"][:100]
    save_file(w, d / "model.safetensors")
    with pytest.raises(CheckpointError, match="tokenizer has 163 tokens"):
        Pipeline.load(d)


def test_cli_generate_with_stats(bard_dir, tmp_path, capsys):
    s = make_sample(3)
    s.image().save(tmp_path / "x.png")
    rc = main(["generate", "--model", str(bard_dir), "--prompt", s.question, "--image", str(tmp_path / "x.png"),
               "--max-new-tokens", "8", "--threshold", "0.5", "--stats"])
    out = capsys.readouterr().out
    assert rc == 0 and "decoding statistics" in out and "tokens_per_forward" in out


def test_cli_generate_refuses_other_block_size(bard_dir, capsys):
    assert main(["generate", "--model", str(bard_dir), "--prompt", "hi", "--block-size", "8"]) == 2
    assert "allow-block-size-mismatch" in capsys.readouterr().err
    assert main(["generate", "--model", str(bard_dir), "--prompt", "hi", "--block-size", "8",
                 "--allow-block-size-mismatch", "--max-new-tokens", "8"]) == 0


def test_kv_buffers_are_released_after_each_call(pipe, monkeypatch):
    """Memory stays bounded: no KV buffer outlives its call, sequential or concurrent."""
    import gc
    import weakref

    import bard_deploy.runtimes.decode as decode

    refs = []

    class Tracked(decode.KVCache):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            refs.append(weakref.ref(self))

    monkeypatch.setattr(decode, "KVCache", Tracked)
    s = make_sample(9)
    threads = [threading.Thread(target=lambda: pipe.generate(s.question, images=[s.image()], max_new_tokens=8))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    list(pipe.stream(s.question, images=[s.image()], max_new_tokens=8))
    gc.collect()
    assert len(refs) == 5 and all(r() is None for r in refs)


def test_bf16_weights_decode_on_the_torch_backend(bard_dir, capsys):
    import torch

    pipe = Pipeline.load(bard_dir, dtype="bf16")
    assert {p.dtype for p in pipe.backend.model.parameters()} == {torch.bfloat16}
    s = make_sample(2)
    r = pipe.generate(s.question, images=[s.image()], max_new_tokens=8)
    assert len(r.token_ids) == 8 and r.stats.nfe == 1 + sum(r.stats.steps_per_block)
    assert main(["generate", "--model", str(bard_dir), "--prompt", "hi", "--dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "int3" in err and err.count("\n") == 1


def test_token_ids_in_and_out(bard_dir, pipe, tmp_path, capsys):
    """generate_ids == generate through the tokenizer (the template's ids with the image pads expanded, or one pad
    per image); stream_ids adds up to it; a directory without tokenizer files decodes ids (and refuses text with a
    one-line error naming generate_ids); the CLI's --prompt-ids --json; bad ids are typed errors."""
    import json
    import shutil

    s = make_sample(4)
    want = pipe.generate(s.question, images=[s.image()], max_new_tokens=12)
    enc = pipe.encoder.encode(pipe._messages(s.question, None, [s.image()]))
    got = pipe.generate_ids(enc.input_ids, images=[s.image()], max_new_tokens=12)
    assert got.token_ids == [want.token_ids] and got.stats.image_tokens == want.stats.image_tokens
    img = pipe.config.image_token_id
    collapsed = [t for i, t in enumerate(enc.input_ids) if t != img or enc.input_ids[i - 1] != img]
    assert pipe.generate_ids(collapsed, images=[s.image()], max_new_tokens=12).token_ids == [want.token_ids]
    assert sum(pipe.stream_ids(collapsed, images=[s.image()], max_new_tokens=12), []) == want.token_ids
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(bard_dir, bare)
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            f.unlink()
    ids_only = Pipeline.load(bare)
    assert ids_only.tokenizer is None
    assert ids_only.generate_ids(collapsed, images=[s.image()], max_new_tokens=12).token_ids == [want.token_ids]
    with pytest.raises(RuntimeInputError, match="no tokenizer files.*generate_ids"):
        ids_only.generate(s.question, max_new_tokens=4)
    for bad in ([], [10**9], [[1, 2], []]):
        with pytest.raises(RuntimeInputError):
            pipe.generate_ids(bad, max_new_tokens=4)
    with pytest.raises(RuntimeInputError, match="2 images given"):
        pipe.generate_ids(collapsed, images=[s.image(), s.image()], max_new_tokens=4)
    capsys.readouterr()
    assert main(["generate", "--model", str(bare), "--prompt-ids", ",".join(map(str, collapsed)), "--image",
                 str(_saved(s.image(), tmp_path)), "--max-new-tokens", "12", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["token_ids"] == want.token_ids and "text" not in line and line["stats"]["nfe"] >= 1


def _saved(image, directory):
    path = directory / "image.png"
    image.save(path)
    return path


def test_each_result_has_its_own_statistics_counts_and_finish_reason(bard_dir, pipe):
    """generate_batch: every row's Result.stats is its own (its tokens, finish reason, image tokens; the call's
    forwards), call_stats is the whole call's, and the counts are the prompt's; EOS -> "eos", the budget ->
    "length"."""
    samples = [make_sample(i) for i in (1, 2)]
    convs = [s.messages()[:1] for s in samples] + [[{"role": "user", "content": "Describe the picture."}]]
    free = pipe.generate_batch(convs, max_new_tokens=8)
    assert [r.finish_reason for r in free] == ["length"] * 3 and all(r.completion_tokens == 8 for r in free)
    eos = free[0].token_ids[2]                                     # make a token the first row reaches an EOS
    rows = Pipeline.load(bard_dir, eos_token_ids=[eos]).generate_batch(convs, max_new_tokens=8)
    assert rows[0].finish_reason == "eos" and rows[0].token_ids[-1] == eos and len(rows[0].token_ids) <= 3
    assert len({id(r.stats) for r in rows}) == 3 and all(r.call_stats is rows[0].call_stats for r in rows)
    assert [r.stats.tokens for r in rows] == [[len(r.token_ids)] for r in rows]
    assert rows[0].call_stats.tokens == [len(r.token_ids) for r in rows]
    assert all(r.stats.nfe == rows[0].call_stats.nfe for r in rows)
    encoded = [pipe.encoder.encode(c) for c in convs]
    assert [r.prompt_tokens for r in rows] == [len(e.input_ids) for e in encoded]
    assert [r.image_tokens for r in rows] == [9, 9, 0] and [r.stats.image_tokens for r in rows] == [9, 9, 0]
    assert rows[2].as_dict()["usage"] == {"prompt_tokens": rows[2].prompt_tokens, "image_tokens": 0,
                                          "completion_tokens": len(rows[2].token_ids)}


def test_stop_strings_end_the_answer(pipe):
    """stop=[...]: the text ends before the first stop string, finish reason "stop", the ids up to the token that
    completed it; stream gives the same text and ends there; bad stops and unknown options are typed errors."""
    s = make_sample(3)
    full = pipe.generate(s.question, images=[s.image()], max_new_tokens=16)
    words = full.text.split()
    stop = next(w for w in words[2:] if len(w) > 1)
    r = pipe.generate(s.question, images=[s.image()], max_new_tokens=16, stop=[stop, "never there"])
    assert r.finish_reason == "stop" and r.text == full.text[:full.text.index(stop)]
    assert r.token_ids == full.token_ids[:len(r.token_ids)] and len(r.token_ids) < len(full.token_ids)
    assert r.stats.tokens == [len(r.token_ids)] and r.stats.finish_reasons == ["stop"]
    from bard_deploy.runtimes.decode import Stats
    st = Stats()
    assert "".join(pipe.stream(s.question, images=[s.image()], max_new_tokens=16, stop=stop, stats=st)) == r.text
    assert st.finish_reasons == ["stop"]
    for bad in ([""], ["a", "b", "c", "d", "e"], [3]):
        with pytest.raises(RuntimeInputError, match="stop="):
            pipe.generate(s.question, stop=bad)
    with pytest.raises(RuntimeInputError, match=r"unknown decode options 'max_token', 'temprature' \(known: "):
        pipe.generate(s.question, max_token=4, temprature=0.5)
    with pytest.raises(RuntimeInputError, match="unknown decode option 'foo'"):
        list(pipe.stream(s.question, foo=1))
    with pytest.raises(RuntimeInputError, match="stop strings end text"):
        pipe.generate_ids([1, 2, 3], stop=["x"])


def test_generate_json_prints_one_result_object(bard_dir, capsys):
    """generate --json: one JSON object with text, ids, finish reason, usage and statistics; --stop applies."""
    import json

    assert main(["generate", "--model", str(bard_dir), "--prompt", "Describe the picture.", "--max-new-tokens",
                 "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "token_ids", "finish_reason", "usage", "stats"} and out["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == len(out["token_ids"]) == 6
    assert main(["generate", "--model", str(bard_dir), "--prompt", "x", "--json", "--stream"]) == 2
    assert "excludes --stream" in capsys.readouterr().err
