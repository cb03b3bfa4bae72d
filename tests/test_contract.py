"""The IO contract (iospec): feeds and outputs round-trip, symbolic shapes evaluate, the graph order is the
table's; recorded trajectories keep the past once per prompt and leave the Pipeline they were given untouched."""

import pytest
import torch

from bard_deploy import iospec
from bard_deploy.calibration.collect import record_trajectories
from bard_deploy.config import ModelConfig
from bard_deploy.embedded import new_checkpoint
from bard_deploy.runtimes.api import Pipeline
from tiny import qwen3_vl_config


def test_concrete_shapes():
    assert iospec.concrete(("batch", 1, "seq", "past+seq"), {"batch": 2, "seq": 3, "past": 4}) == (2, 1, 3, 7)
    assert iospec.concrete((3, "batch"), {"batch": 1}) == (3, 1)


def test_feeds_and_outputs_round_trip_in_table_order():
    io = iospec.DecoderIO.for_config(ModelConfig.from_dict(qwen3_vl_config().to_dict()))
    f = io.dummy_feeds(batch=2, seq=3, past=4)
    assert list(f) == io.input_names
    for spec in io.inputs:
        assert tuple(f[spec.name].shape) == iospec.concrete(spec.shape, {"batch": 2, "seq": 3, "past": 4,
                                                                          "keep": 3})
    x, pos, bias, past, ds, keep = io.unpack_feeds(f)
    assert ds.shape == (io.num_deepstack, 2, 3, io.hidden_size) and not ds.any()      # no image: zeros
    assert keep.tolist() == [0, 1, 2]                                                 # default: every position
    again = io.feeds(x, pos, bias, past, ds, keep=2)
    assert again.keys() == f.keys() and again[iospec.LOGITS_TO_KEEP].tolist() == [1, 2]
    new_kv = [(torch.zeros(2, io.num_kv_heads, 3, io.head_dim),) * 2 for _ in range(io.num_layers)]
    out = io.outputs_of(torch.zeros(2, 3, io.vocab_size), new_kv)
    assert list(out) == io.output_names
    logits, kv = io.unpack_outputs(out)
    assert logits.shape == (2, 3, io.vocab_size) and len(kv) == io.num_layers
    assert io.table()["inputs"][2] == [iospec.ATTENTION_BIAS, "float32", ["batch", 1, "seq", "past+seq"]]


def test_recording_does_not_touch_the_callers_pipeline(tmp_path):
    from bard_deploy.data.synthetic import make_sample

    pipe = Pipeline.load(new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2))
    backend = pipe.backend
    s = make_sample(0)
    steps = record_trajectories(pipe, [s.messages(), make_sample(1).messages()], max_new_tokens=8, threshold=0.9)
    assert pipe.backend is backend and len(steps) >= 6                 # prefill + at least one step per block
    assert len(steps.pasts) == 2                                        # the past K/V once per prompt, not per step
    for j, past in enumerate(steps.pasts):                              # the longest past of that prompt
        lengths = [length for prompt, length, _ in steps.steps if prompt == j]
        assert lengths[0] == 0 and lengths == sorted(lengths) and max(lengths) == past[0].shape[2]
    for feeds in steps.feeds():                                         # full feeds again, one at a time
        assert set(feeds) == set(backend.io.input_names)
        assert feeds[iospec.past_key(0)].shape[2] == feeds[iospec.ATTENTION_BIAS].shape[-1] - feeds[
            iospec.INPUTS_EMBEDS].shape[1]


def test_recorded_steps_replay_exactly_and_survive_a_save(tmp_path):
    """The export validates a graph against steps recorded with their outputs and replayed after the PyTorch
    weights are gone; the static quantizer reads the saved file in another process. Both must give back exactly
    what the backend saw and returned."""
    from bard_deploy.calibration.collect import Trajectories
    from bard_deploy.data.synthetic import make_sample

    pipe = Pipeline.load(new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2))
    rec = record_trajectories(pipe, [make_sample(0).messages(), make_sample(1).messages()], outputs=True,
                              max_new_tokens=8, threshold=0.9)
    assert len(rec.outputs) == len(rec) > 0
    for feeds, expected in rec.records():                   # the same step again gives the recorded outputs
        got = pipe.backend.step(feeds)
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    rec.save(tmp_path / "c.safetensors", {"samples": 2})
    back = Trajectories.load(tmp_path / "c.safetensors")
    assert [(p, n) for p, n, _ in back.steps] == [(p, n) for p, n, _ in rec.steps]
    for a, b in zip(back.feeds(), rec.feeds(), strict=True):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="without their outputs"):
        next(back.records())


def test_logits_to_keep_computes_only_the_positions_read(tmp_path):
    """The step computes logits for the kept positions only, equal to those rows of the full logits, in PyTorch
    and in the exported graph; the decoded tokens do not change (the loop asks for what it reads)."""
    from bard_deploy.converters.export import export
    from bard_deploy.data.synthetic import make_sample
    from bard_deploy.runtimes.ort_backend import OrtBackend

    ckpt = new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2)
    pipe = Pipeline.load(ckpt)
    io = pipe.backend.io
    full = io.dummy_feeds(batch=2, seq=6, past=5)
    last2 = dict(full, **{iospec.LOGITS_TO_KEEP: torch.tensor([4, 5])})
    ref = pipe.backend.step(full)[iospec.LOGITS]
    assert ref.shape[1] == 6
    got = pipe.backend.step(last2)
    assert got[iospec.LOGITS].shape[1] == 2 and torch.allclose(got[iospec.LOGITS], ref[:, 4:], atol=1e-6)
    assert torch.equal(got[iospec.new_key(0)], pipe.backend.step(full)[iospec.new_key(0)])   # K/V of all T
    export(ckpt, tmp_path / "ex", log=lambda *a: None)
    ort = OrtBackend(tmp_path / "ex")
    for keep in (1, 3, 6):
        feeds = dict(full, **{iospec.LOGITS_TO_KEEP: torch.arange(6 - keep, 6)})
        assert torch.allclose(ort.step(feeds)[iospec.LOGITS], ref[:, 6 - keep:], atol=1e-4)
    s = make_sample(3)
    a = pipe.generate(s.question, images=[s.image()], max_new_tokens=12)
    b = Pipeline.load(tmp_path / "ex").generate(s.question, images=[s.image()], max_new_tokens=12)
    assert a.token_ids == b.token_ids
