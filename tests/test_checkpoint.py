"""Checkpoints: exact round trip (single file and sharded), Bard-VL import, and one-line errors naming
the culprit for every broken-checkpoint case."""

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bard_deploy.checkpoint import INDEX, WEIGHTS, load_model, save_model
from bard_deploy.config import BARD_VL_MASK_TOKEN_ID, ModelConfig, load_config
from bard_deploy.errors import CheckpointError, ConfigError
from tiny import MASK_ID, hf_qwen3, hf_qwen3_vl, qwen3_vl_config


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vl")
    hf_qwen3_vl().save_pretrained(d)
    (d / "tokenizer.json").write_text("{}")  # a side file that must travel with the checkpoint
    return d


def copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("shard_bytes", [2 * 1024**3, 64 * 1024], ids=["single", "sharded"])
def test_round_trip_is_exact(vl_dir, tmp_path, shard_bytes):
    m = load_model(vl_dir)
    cfg = m.config.with_bard(mask_token_id=MASK_ID, block_size=8, stage="b8", parent="b4")
    out = save_model(m, tmp_path / "out", config=cfg, side_files_from=vl_dir, max_shard_bytes=shard_bytes)
    assert ((out / INDEX).is_file()) == (shard_bytes < 1024**2)
    assert (out / "tokenizer.json").is_file()
    back = load_model(out)
    assert_same(m, back)
    assert back.config == cfg and back.config.bard.block_size == 8
    # what we write stays loadable by transformers
    from transformers import Qwen3VLForConditionalGeneration
    hf = Qwen3VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(hf.lm_head.weight, m.lm_head.weight)


def test_text_only_round_trip_keeps_qwen3_layout(tmp_path):
    hf_qwen3().save_pretrained(tmp_path / "src")
    m = load_model(tmp_path / "src")
    save_model(m, tmp_path / "out")
    with safe_open(tmp_path / "out" / WEIGHTS, "pt") as f:
        assert "model.embed_tokens.weight" in f.keys()
    assert_same(m, load_model(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "qwen3"


def test_save_replaces_existing_checkpoint_atomically(vl_dir, tmp_path):
    m = load_model(vl_dir)
    save_model(m, tmp_path / "out")
    (tmp_path / "out" / "stale.txt").write_text("old")
    save_model(m, tmp_path / "out")
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or .old directory left behind


def test_bard_vl_import(vl_dir, tmp_path):
    d = copy(vl_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bard_vl"
    cfg["architectures"] = ["BardVLForConditionalGeneration"]
    cfg["text_config"]["vocab_size"] = 151936  # the real vocabulary, so the mask id fits
    (d / "config.json").write_text(json.dumps(cfg))
    c = load_config(d, block_size=4)
    assert c.arch == "qwen3_vl" and c.bard.mask_token_id == BARD_VL_MASK_TOKEN_ID
    assert c.bard.prompt_attention == "block" and c.bard.block_size == 4
    out = c.to_dict()
    assert out["model_type"] == "qwen3_vl" and out["architectures"] == ["Qwen3VLForConditionalGeneration"]
    cfg["text_config"]["vocab_size"] = 151000                 # a vocabulary without the reference's mask id
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="does not hold the reference's mask id 151671: pass its mask id"):
        load_config(d, block_size=4)
    assert load_config(d, block_size=4, mask_token_id=150999).bard.mask_token_id == 150999


# ---- broken checkpoints: the error class, and the message names the culprit ----------------------

def corrupt(vl_dir, tmp_path, edit):
    d = copy(vl_dir, tmp_path)
    edit(d)
    return d


def rewrite_weights(d, fn):
    with safe_open(d / WEIGHTS, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(fn(tensors), d / WEIGHTS)


CASES = {
    "unknown key": (lambda d: rewrite_weights(d, lambda t: {**t, "model.language_model.extra.weight": torch.ones(2)}),
                    CheckpointError, "model.language_model.extra.weight"),
    "missing key": (lambda d: rewrite_weights(d, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up" not in k}),
                    CheckpointError, "model.language_model.layers.1.mlp.up_proj.weight"),
    "wrong shape": (lambda d: rewrite_weights(d, lambda t: {**t, "lm_head.weight": torch.zeros(3, 64)}),
                    CheckpointError, "lm_head.weight"),
    "missing config": (lambda d: (d / "config.json").unlink(), ConfigError, "config.json"),
    "config not json": (lambda d: (d / "config.json").write_text("{oops"), ConfigError, "config.json"),
    "config missing field": (lambda d: _edit_cfg(d, lambda c: c["text_config"].pop("hidden_size")),
                             ConfigError, "hidden_size"),
    "config wrong type": (lambda d: _edit_cfg(d, lambda c: c["text_config"].update(num_hidden_layers="4")),
                          ConfigError, "num_hidden_layers"),
    "mrope section sum": (lambda d: _edit_cfg(d, lambda c: c["text_config"]["rope_parameters"].update(
        mrope_section=[24, 20, 20])), ConfigError, "mrope_section"),
    "unknown model type": (lambda d: _edit_cfg(d, lambda c: c.update(model_type="llama")), ConfigError, "llama"),
    "missing weights": (lambda d: (d / WEIGHTS).unlink(), CheckpointError, WEIGHTS),
    "empty weights": (lambda d: (d / WEIGHTS).write_bytes(b""), CheckpointError, WEIGHTS),
    "truncated weights": (lambda d: (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:5000]),
                          CheckpointError, WEIGHTS),
    "pickle renamed": (lambda d: (d / WEIGHTS).write_bytes(pickle.dumps({"a": 1})), CheckpointError, WEIGHTS),
    "pickle only": (lambda d: ((d / WEIGHTS).unlink(), (d / "pytorch_model.bin").write_bytes(b"x")),
                    CheckpointError, "pytorch_model.bin"),
    "missing shard": (lambda d: (d / INDEX).write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}})),
                      CheckpointError, "model-2.safetensors"),
}


def _edit_cfg(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


@pytest.mark.parametrize("case", CASES)
def test_broken_checkpoint_is_a_one_line_error(vl_dir, tmp_path, case):
    edit, error, culprit = CASES[case]
    d = corrupt(vl_dir, tmp_path, edit)
    with pytest.raises(error) as e:
        load_model(d)
    msg = str(e.value)
    assert culprit in msg and "\n" not in msg


def test_tied_head_must_equal_embedding(tmp_path):
    cfg = ModelConfig.from_dict(qwen3_vl_config(tie=True).to_dict())
    from bard_deploy.vlm import BardVLM
    m = BardVLM(cfg)
    save_model(m, tmp_path / "c")
    rewrite_weights(tmp_path / "c", lambda t: {**t, "lm_head.weight": torch.zeros_like(
        t["model.language_model.embed_tokens.weight"])})
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(tmp_path / "c")


# ---- lean loading: meta construction, tensors assigned one at a time, a chosen dtype --------------------

def test_lean_load_equals_an_eager_load_exactly(vl_dir):
    from safetensors.torch import load_file

    from bard_deploy.vlm import BardVLM
    m = load_model(vl_dir)
    eager = BardVLM(m.config)
    eager.load_state_dict(load_file(vl_dir / WEIGHTS))
    assert_same(m, eager)                                         # parameters, bitwise
    for (n, a), (_, b) in zip(m.named_buffers(), eager.named_buffers(), strict=True):
        assert torch.equal(a, b) and a.device.type == "cpu", n    # the rotary tables rebuilt off the meta device
    assert not any(p.is_meta for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_a_lower_precision(vl_dir, dtype):
    from tiny import image_inputs
    ref = load_model(vl_dir)
    m = load_model(vl_dir, dtype=dtype)
    assert {p.dtype for p in m.parameters()} == {dtype}
    assert {b.dtype for b in m.buffers()} <= {torch.float32, torch.int64}     # rotary tables stay exact
    pv, grid, n = image_inputs()
    ids = torch.tensor([[5] + [990] * n + [7, 8]])
    with torch.no_grad():
        a = ref.step(*_step_inputs(ref, ids, pv, grid))[0]
        b = m.step(*_step_inputs(m, ids, pv, grid))[0]
    assert b.dtype == dtype and (a - b.float()).abs().max() < 0.05 * a.abs().max()


def _step_inputs(model, ids, pv, grid):
    x, ds = model.embed(ids, pv, grid)
    pos, _ = model.positions(ids, grid, torch.ones_like(ids))
    L = ids.shape[1]
    bias = torch.full((1, 1, L, L), float("-inf")).triu(1).to(x.dtype)
    return x, pos, bias, None, ds


def test_written_directories_get_the_usual_modes(vl_dir, tmp_path):
    """mkdtemp makes 0700 directories and safetensors 0600 files: a checkpoint must be readable like any file."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        out = save_model(load_model(vl_dir), tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) & 0o055 == 0o055
    assert all(stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044 for f in out.iterdir())


def test_updating_a_loaded_model_in_place_never_writes_its_file(vl_dir, tmp_path):
    """Tensors loaded without conversion may share the file's pages (zero copy): training them must not write
    through to the checkpoint."""
    import hashlib
    save_model(load_model(vl_dir), tmp_path / "ck")
    f = tmp_path / "ck" / WEIGHTS
    before = hashlib.sha256(f.read_bytes()).hexdigest()
    m = load_model(tmp_path / "ck")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    assert hashlib.sha256(f.read_bytes()).hexdigest() == before


def test_import_of_an_official_bard_vl_directory(tmp_path, capsys):
    """`import` writes a complete checkpoint of ours (block size, mask, prompt attention, EOS written once,
    weights linked, tokenizer from the source or --tokenizer); every override is checked before anything is
    written, with a one-line error."""
    import json
    import shutil

    from bard_deploy.cli import main
    from bard_deploy.converters.importer import import_checkpoint
    from bard_deploy.errors import CheckpointError, ConfigError
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.standins import write_standin

    src = write_standin(tmp_path / "bard-vl", "tiny", bard_vl=True)
    with pytest.raises(ConfigError, match="--block-size"):
        import_checkpoint(src, tmp_path / "a")
    with pytest.raises(ConfigError, match="mask_token_id 10000000 is outside the vocabulary"):
        import_checkpoint(src, tmp_path / "a", block_size=4, mask_token_id=10**7)
    with pytest.raises(ConfigError, match="--eos-token-id -1"):
        import_checkpoint(src, tmp_path / "a", block_size=4, eos_token_ids=[-1])
    assert not (tmp_path / "a").exists()
    assert main(["import", str(src), str(tmp_path / "a"), "--block-size", "4", "--eos-token-id", "151645",
                 "--prompt-attention", "causal"]) == 0
    out = tmp_path / "a"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["bard"]["block_size"] == 4
    assert cfg["bard"]["mask_token_id"] == 151671 and cfg["bard"]["prompt_attention"] == "causal"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [151645]
    assert any(f.is_symlink() for f in out.iterdir())
    pipe = Pipeline.load(out)                                # no --block-size needed any more
    assert pipe.config.bard.block_size == 4 and pipe.eos_ids == [151645]
    assert len(pipe.generate("Describe the picture.", max_new_tokens=4).token_ids) == 4
    bare = tmp_path / "bare"                                 # an official directory without tokenizer files
    shutil.copytree(src, bare)
    for f in bare.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files: pass --tokenizer"):
        import_checkpoint(bare, tmp_path / "b", block_size=4)
    import_checkpoint(bare, tmp_path / "b", block_size=4, tokenizer=src, copy=True)
    assert (tmp_path / "b" / "tokenizer_config.json").is_file() or (tmp_path / "b" / "tokenizer.json").is_file()
    assert not any(f.is_symlink() for f in (tmp_path / "b").iterdir())
    assert Pipeline.load(tmp_path / "b").config.bard.prompt_attention == "block"
    capsys.readouterr()
    assert main(["import", str(src), str(tmp_path / "a"), "--block-size", "4"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_one_off_overrides_at_load(tmp_path, capsys):
    """The bard section's mask id and prompt attention and the EOS ids can be overridden at load (API and CLI),
    checked with one-line errors; an export refuses the graph-held ones; an AR checkpoint refuses them all."""
    from bard_deploy.cli import main
    from bard_deploy.embedded import new_checkpoint
    from bard_deploy.errors import ConfigError, RuntimeInputError
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.standins import write_standin

    src = write_standin(tmp_path / "bard-vl", "tiny", bard_vl=True)
    pipe = Pipeline.load(src, mask_token_id=151670, prompt_attention="causal", eos_token_ids=[151645, 5])
    assert pipe.config.bard.mask_token_id == 151670 and pipe.config.bard.prompt_attention == "causal"
    assert pipe.eos_ids == [5, 151645]
    with pytest.raises(ConfigError, match="mask_token_id 10000000 is outside the vocabulary"):
        Pipeline.load(src, mask_token_id=10**7)
    with pytest.raises(RuntimeInputError, match="eos_token_ids must be token ids"):
        Pipeline.load(src, eos_token_ids=[-3])
    ours = new_checkpoint(tmp_path / "b4", bard={"block_size": 4}, hidden=64, layers=2)
    assert Pipeline.load(ours, prompt_attention="block").config.bard.prompt_attention == "block"
    ar = new_checkpoint(tmp_path / "src", hidden=64, layers=2)
    with pytest.raises(ConfigError, match="autoregressive checkpoint"):
        Pipeline.load(ar, mask_token_id=3)
    from bard_deploy.converters.export import export
    export(ours, tmp_path / "ex", log=lambda *a: None)
    with pytest.raises(RuntimeInputError, match="holds its mask id"):
        Pipeline.load(tmp_path / "ex", mask_token_id=3)
    capsys.readouterr()
    assert main(["generate", "--model", str(ours), "--prompt", "Describe the picture.", "--eos-token-id", "0",
                 "--max-new-tokens", "8", "--json"]) == 0
