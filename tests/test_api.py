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
