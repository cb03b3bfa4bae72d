"""Lossless speculative decoding (speculative="source"): the BARD model drafts a block, the AR source verifies it
in one causal forward; the output is the source's greedy decode, on torch and onnxruntime, batch 1 and mixed
batches; the verify pass commits only the kept prefix's K/V."""

import pytest
import torch

from bard_deploy.converters.export import export
from bard_deploy.data.synthetic import make_sample
from bard_deploy.embedded import new_checkpoint
from bard_deploy.errors import RuntimeInputError
from bard_deploy.runtimes import decode
from bard_deploy.runtimes.api import Pipeline

SIZES = dict(hidden=64, layers=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    return new_checkpoint(root / "ar", seed=1, **SIZES), new_checkpoint(root / "b4", seed=2, bard={"block_size": 4},
                                                                        **SIZES)


def convs():
    rows = [make_sample(i).messages()[:1] for i in (1, 2, 6)]
    rows.insert(1, [{"role": "user", "content": "Describe the picture and how many shapes are there?"}])
    return rows


def reference(ar_dir, rows, n=20, **load):
    ar = Pipeline.load(ar_dir, **load)
    return [ar.generate_batch([c], ar=True, max_new_tokens=n)[0].token_ids for c in rows]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_output_equals_the_sources_greedy_decode(dirs, tmp_path, backend):
    """Alone and in a mixed batch (image and text-only rows of different lengths), on torch and on the exports."""
    ar_dir, b_dir = dirs
    if backend == "onnxruntime":
        ar_dir, b_dir = (export(d, tmp_path / d.name, log=lambda *a: None) and tmp_path / d.name
                         for d in (ar_dir, b_dir))
    rows = convs()
    want = reference(ar_dir, rows)
    spec = Pipeline.load(b_dir, verifier=ar_dir)
    alone = [spec.generate_batch([c], speculative="source", max_new_tokens=20)[0] for c in rows]
    assert [r.token_ids for r in alone] == want
    assert all(r.stats.as_dict()["speculative"]["verify_nfe"] >= 1 for r in alone)
    assert [r.token_ids for r in spec.generate_batch(rows, speculative="source", max_new_tokens=20)] == want
    s = make_sample(1)
    streamed = "".join(spec.stream(s.question, images=[s.image()], speculative="source", max_new_tokens=20))
    assert streamed == spec.decode_text(want[2])


def test_the_verifier_keeps_exactly_the_agreeing_prefix(dirs, monkeypatch):
    """An oracle drafter (the source's own continuation with one planted error per round, at a different place
    each round, sometimes none) drives the accept / commit rule: each round keeps exactly the tokens before the
    error plus the source's token, the output is still the source's, and the source's cache holds exactly the
    kept tokens (batch 1: no column of a rejected one; batch 2: rejected ones only as PAD, never visible)."""
    ar_dir, b_dir = dirs
    rows = convs()[:2]
    n, block = 24, 4
    want = reference(ar_dir, rows, n)
    spec = Pipeline.load(b_dir, verifier=ar_dir)
    prompt_len = [len(spec.encode(c).input_ids) for c in rows]
    planted: list[list[int]] = []
    sessions = []

    def oracle(session, unseen, length, r, opts, mask_id):
        canvas, ks = torch.zeros(len(unseen), block, dtype=torch.long), []
        for i in range(len(unseen)):
            pos = int(length[i]) - prompt_len[i] + 1             # the draft follows the pending token
            ref = want[row_of[i]] + [0] * (n + block + 2)
            draft = ref[pos:pos + block]
            k = (r + i) % (block + 1)                        # 0 .. block: where the error goes (block: none)
            if k < block:
                draft[k] = (draft[k] + 1) % spec.config.text.vocab_size
            canvas[i] = torch.tensor(draft)
            ks.append(k)
        planted.append(ks)
        return canvas

    real_session = decode.Session

    def recording_session(*a, **kw):
        s = real_session(*a, **kw)
        sessions.append(s)
        return s

    monkeypatch.setattr(decode, "draft_block", oracle)
    monkeypatch.setattr(decode, "Session", recording_session)
    for batch in ([rows[0]], rows):
        row_of = [0] if len(batch) == 1 else [0, 1]
        planted.clear()
        sessions.clear()
        got = spec.generate_batch(batch, speculative="source", max_new_tokens=n)
        assert [r.token_ids for r in got] == [want[j] for j in row_of]
        accepted = got[0].call_stats.accepted
        assert accepted[:len(row_of) * 3] == [min(k, block) for ks in planted[:3] for k in ks]   # k per round
        vsess = sessions[1]
        visible = (vsess.cache._kind[:, :vsess.cache.length] != 0).sum(1).tolist()
        committed = [prompt_len[j] + len(want[j]) - 1 for j in row_of]         # all but the last pending token
        assert visible == committed                       # every kept token, no rejected one, is visible
        if len(batch) == 1:
            assert vsess.cache.length == committed[0]      # and alone not even a PAD column is spent on one
        else:
            assert vsess.cache.length > max(visible)       # a row that kept fewer than the other got PAD there


def test_speculative_errors_are_typed(dirs, tmp_path):
    ar_dir, b_dir = dirs
    ex = export(b_dir, tmp_path / "ex", log=lambda *a: None) and tmp_path / "ex"
    with pytest.raises(RuntimeInputError, match="needs the AR source to verify with"):
        Pipeline.load(ex).generate("hi", speculative="source", max_new_tokens=4)
    spec = Pipeline.load(b_dir, verifier=ar_dir)
    with pytest.raises(RuntimeInputError, match="needs temperature 0"):
        spec.generate("hi", speculative="source", temperature=0.7, max_new_tokens=4)
    with pytest.raises(RuntimeInputError, match="must be 'source' or 'self'"):
        spec.generate("hi", speculative="draft", max_new_tokens=4)
    with pytest.raises(RuntimeInputError, match="needs a dual-mode checkpoint"):
        spec.generate("hi", speculative="self", max_new_tokens=4)
    with pytest.raises(RuntimeInputError, match="not an AR source"):
        Pipeline.load(b_dir, verifier=b_dir)


def test_two_hundred_test_prompts_equal_the_sources_greedy_decode(dirs):
    """The target's count: 200 synthetic test prompts (images, batches of 20) decode in speculative mode to
    exactly the source's greedy tokens."""
    from bard_deploy.evaluate import synthetic_conversations

    ar_dir, b_dir = dirs
    rows = [c[:-1] for c in synthetic_conversations("test", 200)]
    ar, spec = Pipeline.load(ar_dir), Pipeline.load(b_dir, verifier=ar_dir)
    for i in range(0, 200, 20):
        want = [r.token_ids for r in ar.generate_batch(rows[i:i + 20], ar=True, max_new_tokens=12)]
        got = [r.token_ids for r in spec.generate_batch(rows[i:i + 20], speculative="source", max_new_tokens=12)]
        assert got == want, i
