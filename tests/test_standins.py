"""Stand-ins in the official on-disk format: what they hold, that transformers and our loader read them alike,
every load dtype, and the Bard-VL relabelled copy."""

import json

import pytest
import torch

from bard_deploy.checkpoint import INDEX, load_model
from bard_deploy.config import BARD_VL_MASK_TOKEN_ID, load_config
from bard_deploy.errors import ConfigError
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.standins import official_config, write_standin


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_standin(tmp_path_factory.mktemp("st") / "qwen3-vl-tiny", "tiny", max_shard_bytes=8 * 2**20)


def test_the_official_layout(standin):
    index = json.loads((standin / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((standin / s).is_file() for s in shards)        # sharded, with an index
    cfg = json.loads((standin / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and "rope_scaling" in cfg["text_config"]   # transformers 4.57 layout
    assert cfg["text_config"]["vocab_size"] == 151936 and "lm_head.weight" not in index["weight_map"]   # tied
    gen = json.loads((standin / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    pre = json.loads((standin / "preprocessor_config.json").read_text())
    assert pre["size"] == {"longest_edge": 16777216, "shortest_edge": 65536}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(standin)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "</think>")}
    assert ids == {"<|endoftext|>": 151643, "<|im_end|>": 151645, "<|image_pad|>": 151655, "</think>": 151668}


def test_the_official_sizes_have_the_published_shapes():
    c2, c8 = official_config("2b"), official_config("8b")
    assert (c2["text_config"]["num_hidden_layers"], c2["text_config"]["hidden_size"], c2["tie_word_embeddings"]) \
        == (28, 2048, True)
    assert (c8["vision_config"]["depth"], c8["vision_config"]["deepstack_visual_indexes"]) == (27, [8, 16, 24])
    assert official_config("4b", layers=6)["text_config"]["num_hidden_layers"] == 6
    with pytest.raises(ConfigError, match="'70b'"):
        official_config("70b")


def test_transformers_and_our_loader_read_it_alike(standin):
    from transformers import Qwen3VLForConditionalGeneration

    from tiny import image_inputs
    hf = Qwen3VLForConditionalGeneration.from_pretrained(standin, dtype=torch.float32).eval()
    ours = load_model(standin)
    pv, grid, n = image_inputs()
    ids = torch.tensor([[151644, 10, 151652] + [151655] * n + [151653, 11, 12]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == 151655).int()).logits
        x, ds = ours.embed(ids, pv, grid)
        pos, _ = ours.positions(ids, grid, torch.ones_like(ids))
        L = ids.shape[1]
        got, _ = ours.step(x, pos, torch.full((1, 1, L, L), float("-inf")).triu(1), None, ds)
    assert (got - ref).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_it_loads_and_generates_in_every_dtype(standin, dtype):
    from bard_deploy.data.synthetic import make_sample
    from bard_deploy.devices import resolve_dtype
    pipe = Pipeline.load(standin, dtype=dtype)
    assert {p.dtype for p in pipe.backend.model.parameters()} == {resolve_dtype(dtype)}
    s = make_sample(1)
    r = pipe.generate(s.question, images=[s.image()], ar=True, max_new_tokens=4)
    assert len(r.token_ids) == 4 and r.stats.nfe == 4


def test_the_bard_vl_copy(tmp_path):
    d = write_standin(tmp_path / "bard-vl-tiny", "tiny", bard_vl=True)
    assert json.loads((d / "config.json").read_text())["model_type"] == "bard_vl"
    c = load_config(d, block_size=4)
    assert c.bard.mask_token_id == BARD_VL_MASK_TOKEN_ID and c.bard.prompt_attention == "block"
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(d).convert_tokens_to_ids("<|mask|>") == BARD_VL_MASK_TOKEN_ID
    b = load_model(d, block_size=4).config.bard
    assert (b.block_size, b.mask_token_id) == (4, BARD_VL_MASK_TOKEN_ID)


def test_the_cli_writes_a_standin(tmp_path, capsys):
    from bard_deploy.cli import main
    assert main(["standin", "--size", "tiny", "--out", str(tmp_path / "s"), "--bard-vl"]) == 0
    assert "qwen3_vl" in capsys.readouterr().out and (tmp_path / "s" / INDEX).is_file()
    assert main(["standin", "--size", "13b", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "13b" in err and not (tmp_path / "x").exists()
