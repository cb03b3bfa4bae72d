"""Export: fp32 parity on recorded real steps, IO names, onnxruntime == torch tokens, manifest checks, --force,
INT8 and its gate."""

import json
from pathlib import Path

import onnx
import pytest
import torch

from bard_deploy import iospec
from bard_deploy.calibration.gate import QuantOptions
from bard_deploy.cli import main
from bard_deploy.converters.export import export
from bard_deploy.data.synthetic import make_sample
from bard_deploy.embedded import new_checkpoint
from bard_deploy.errors import BardError, ExportError
from bard_deploy.runtimes.api import Pipeline

SIZES = dict(hidden=64, layers=2)
QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return new_checkpoint(tmp_path_factory.mktemp("ck") / "b4", bard={"block_size": 4}, **SIZES)


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("ex") / "export"
    export(ckpt, out, int8=True, quant_options=QuantOptions(calibration_samples=4, eval_samples=8, gate_top1=0.5,
                                                          gate_em_drop=1.0), **QUIET)
    return out


def test_fp32_parity_on_recorded_steps(exported):
    m = json.loads((exported / "manifest.json").read_text())
    assert m["parity"]["steps"] >= 6 and m["parity"]["tolerance"] == 1e-4
    assert max(m["parity"]["decoder"].values()) <= 1e-4 and max(m["parity"]["vision"].values()) <= 1e-4
    assert m["calibration"]["steps"] > 10 and len(m["calibration"]["sha256"]) == 64
    assert set(m["files"]) >= {"decoder.onnx", "decoder.int8.onnx", "vision.onnx", "embeddings.safetensors",
                               "config.json", "tokenizer.json"}
    assert "calibration.safetensors" not in m["files"] and m["calibration"]["where"] == "beside the export"
    assert (exported.parent / "export.calibration.safetensors").is_file()


def test_graph_io_names_equal_the_io_table(exported):
    from bard_deploy.config import load_config
    io = iospec.DecoderIO.for_config(load_config(exported), fused_head=True)      # exports carry the fused head
    g = onnx.load(str(exported / "decoder.onnx")).graph
    assert [i.name for i in g.input] == [s.name for s in io.inputs]
    assert [o.name for o in g.output] == [s.name for s in io.outputs]
    assert not any(n.op_type in ("GroupQueryAttention", "Attention") for n in g.node)
    assert any(n.op_type == "Softmax" for n in g.node)


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_onnxruntime_generation_equals_torch(ckpt, exported, threshold):
    s = make_sample(4)
    ref = Pipeline.load(ckpt).generate(s.question, images=[s.image()], max_new_tokens=12, threshold=threshold)
    got = Pipeline.load(exported, variant="fp32").generate(s.question, images=[s.image()], max_new_tokens=12,
                                                           threshold=threshold)
    assert got.token_ids == ref.token_ids and got.stats.nfe == ref.stats.nfe


def test_int8_variant_runs_and_reports_its_gate(exported):
    m = json.loads((exported / "manifest.json").read_text())
    g = m["int8"]
    assert g["passed"] and 0 <= g["top1_agreement"] <= 1 and g["held_out_steps"] > 0
    assert m["default_variant"] == "int8"
    s = make_sample(5)
    r = Pipeline.load(exported).generate(s.question, images=[s.image()], max_new_tokens=8)
    assert len(r.token_ids) == 8


def test_failed_gate_is_an_error_and_leaves_nothing(ckpt, tmp_path):
    with pytest.raises(ExportError, match="accuracy gate failed"):
        export(ckpt, tmp_path / "x", int8=True, quant_options=QuantOptions(calibration_samples=2, eval_samples=4,
                                                                        gate_top1=1.01), **QUIET)
    assert list(tmp_path.iterdir()) == []


def test_tampered_extra_and_mismatched_exports_are_refused(exported, tmp_path):
    import shutil
    for case in ("tampered", "extra", "mismatch"):
        d = tmp_path / case
        shutil.copytree(exported, d)
        if case == "tampered":
            data = bytearray((d / "decoder.onnx").read_bytes())
            data[-10] ^= 1
            (d / "decoder.onnx").write_bytes(bytes(data))
            match = "decoder.onnx does not match its sha256"
        elif case == "extra":
            (d / "evil.onnx").write_bytes(b"x")
            match = "evil.onnx"
        else:
            m = json.loads((d / "manifest.json").read_text())
            m["block_size"] = 8
            (d / "manifest.json").write_text(json.dumps(m))
            match = "block_size"
        with pytest.raises(ExportError, match=match):
            Pipeline.load(d)
        assert main(["generate", "--model", str(d), "--prompt", "hi"]) == 2


def test_export_into_non_empty_directory_needs_force(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--model", str(ckpt), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert main(["export", "--model", str(ckpt), "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert "decoder.onnx" in capsys.readouterr().out


def test_inspect_summarises_an_export(exported, capsys):
    assert main(["inspect", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "int8 (default)" in out and "fp32" in out and "passed" in out and "any image size" in out
    assert "sha256 verified" in out and "decoder.int8.onnx" in out


def test_the_manifest_is_one_dataclass_with_one_reader(exported, tmp_path):
    import shutil

    from bard_deploy.manifest import Manifest
    m = Manifest.read(exported)
    assert json.loads((exported / "manifest.json").read_text()) == m.to_dict()       # the file is the dataclass
    assert m.variants == ["fp32", "int8"] and m.decoder_graph() == ("int8", "decoder.int8.onnx")
    with pytest.raises(ExportError, match="'int4'"):
        m.decoder_graph("int4")
    d = tmp_path / "unknown-key"
    shutil.copytree(exported, d)
    raw = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**raw, "surprise": 1}))
    with pytest.raises(ExportError, match="unknown key 'surprise'"):
        Manifest.read(d)


def test_calibration_prompts_are_the_synthetic_task_only_for_the_embedded_default(ckpt, tmp_path):
    from bard_deploy.calibration.prompts import ExportPrompts
    from tiny import hf_qwen3_vl
    p = ExportPrompts.for_checkpoint(ckpt, quantize=True, calibration_samples=4, eval_samples=8)
    assert (len(p.validation), len(p.calibration), len(p.held_out), len(p.evaluation)) == (3, 4, 4, 8)
    other = tmp_path / "other"
    hf_qwen3_vl().save_pretrained(other)                     # not the embedded default's tokenizer
    assert len(ExportPrompts.for_checkpoint(other, quantize=False).validation) == 3
    with pytest.raises(ExportError, match="not the embedded default"):
        ExportPrompts.for_checkpoint(other, quantize=True)
    with pytest.raises(BardError, match="no config.json"):
        ExportPrompts.for_checkpoint(tmp_path / "nothing", quantize=False)


# ---- any size: external data, INT4, Bard-VL block size, typed errors ---------------------------------------

@pytest.fixture(scope="module")
def exported_external(ckpt, tmp_path_factory):
    """External data forced at a tiny size (CI covers the > 2 GB path's layout), INT8 and INT4."""
    out = tmp_path_factory.mktemp("ext") / "export"
    export(ckpt, out, int8=True, int4=True, external_data=True, quant_options=QuantOptions(
        calibration_samples=4, eval_samples=8, gate_top1=0.5, gate_em_drop=1.0), **QUIET)
    return out


def test_external_data_is_one_file_per_graph_and_hashed(exported_external):
    m = json.loads((exported_external / "manifest.json").read_text())
    for graph in ("decoder.onnx", "decoder.int8.onnx", "decoder.int4.onnx", "vision.onnx"):
        assert graph in m["files"] and graph + ".data" in m["files"], graph
    proto = onnx.load(str(exported_external / "decoder.onnx"), load_external_data=False)
    # the tiny model is tied: its head reads the one embedding table, everything else is in the one data file
    assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} \
        == {"decoder.onnx.data", "embeddings.safetensors"}
    assert m["int4"]["passed"] and m["default_variant"] == "int8" and m["graphs"]["decoder"]["int4"]


def _locations(graph: Path) -> dict[str, str]:
    return {t.name: {e.key: e.value for e in t.external_data}["location"]
            for t in onnx.load(str(graph), load_external_data=False).graph.initializer
            if t.data_location == onnx.TensorProto.EXTERNAL}


def test_the_vocabulary_table_is_stored_once(ckpt, exported_external, tmp_path):
    """A tied head's weight is the embedding table: decoder.onnx points into embeddings.safetensors (transposed,
    page-aligned) instead of holding a second copy, lookups read its columns, and a quantized graph whose head
    stays fp32 shares it too. A tensor that is not the bytes it claims to share is refused."""
    import shutil

    from bard_deploy.calibration.quantize import lm_head_matmuls, quantize_int4
    from bard_deploy.checkpoint import load_model
    from bard_deploy.onnx_files import ALIGN, EmbeddingTable, Shared, gather_external_data

    table = EmbeddingTable(exported_external / "embeddings.safetensors")
    weight = load_model(ckpt).language_model.embed_tokens.weight.detach()
    assert table.transposed and table.table.offset % ALIGN == 0 and table.vocab_size == weight.shape[0]
    ids = torch.tensor([[0, 3, 7], [7, 7, 1]])
    assert torch.equal(table(ids), weight[ids])
    shared = [n for n, loc in _locations(exported_external / "decoder.onnx").items() if loc == "embeddings.safetensors"]
    assert len(shared) == 1
    data = (exported_external / "decoder.onnx.data").stat().st_size
    assert data < sum(p.numel() * 4 for p in load_model(ckpt).language_model.parameters())   # no second copy

    d = tmp_path / "copy"
    shutil.copytree(exported_external, d)
    head = lm_head_matmuls(d / "decoder.onnx")
    quantize_int4(d / "decoder.onnx", d / "head-fp32.onnx", exclude=head)
    assert shared[0] in {n for n, loc in _locations(d / "head-fp32.onnx").items() if loc == "embeddings.safetensors"}
    assert "embeddings.safetensors" not in _locations(d / "decoder.int4.onnx").values()   # its head is int4
    from bard_deploy.runtimes.ort_backend import run, session
    io = iospec.DecoderIO.for_config(load_model(ckpt).config)
    feeds = io.dummy_feeds(batch=1, seq=2, past=3)
    assert run(session(d / "head-fp32.onnx"), [iospec.LOGITS], feeds)[iospec.LOGITS].shape[-1] == table.vocab_size

    wrong = {shared[0]: Shared(d / "embeddings.safetensors", "embeddings.safetensors", 0, 4 * weight.numel())}
    with pytest.raises(ExportError, match="is not the bytes of embeddings.safetensors"):
        gather_external_data(d / "decoder.onnx", shared=wrong)


def test_external_data_and_int4_graphs_decode(ckpt, exported_external):
    s = make_sample(4)
    ref = Pipeline.load(ckpt).generate(s.question, images=[s.image()], max_new_tokens=12)
    got = Pipeline.load(exported_external, variant="fp32").generate(s.question, images=[s.image()], max_new_tokens=12)
    assert got.token_ids == ref.token_ids
    int4 = Pipeline.load(exported_external, variant="int4").generate(s.question, images=[s.image()],
                                                                      max_new_tokens=8)
    assert len(int4.token_ids) == 8
    g = onnx.load(str(exported_external / "decoder.int4.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" for n in g.node)


@pytest.mark.parametrize("variant", ["fp32", "int8", "int4"])
def test_every_variant_decodes_each_row_of_a_batch_as_alone(exported_external, variant):
    """Batch invariance: in a mixed batch (two image prompts, a text-only one, different lengths) every row gives
    exactly the tokens it gives alone, on every variant. Dynamic INT8 took one activation scale over the whole
    tensor (every row of the batch); its graph now quantizes per token (no DynamicQuantizeLinear left)."""
    convs = [make_sample(i).messages()[:-1] for i in (1, 6)]
    convs.insert(1, [{"role": "user", "content": "Describe the picture and how many shapes are there?"}])
    pipe = Pipeline.load(exported_external, variant=variant)
    alone = [pipe.generate_batch([c], max_new_tokens=16)[0].token_ids for c in convs]
    together = [r.token_ids for r in pipe.generate_batch(convs, max_new_tokens=16)]
    assert together == alone
    if variant == "int8":
        ops = {n.op_type for n in onnx.load(str(exported_external / "decoder.int8.onnx"),
                                            load_external_data=False).graph.node}
        assert "MatMulInteger" in ops and "DynamicQuantizeLinear" not in ops


def test_inspect_counts_external_data_in_graph_sizes(exported_external, capsys):
    from bard_deploy.onnx_files import graph_bytes
    assert main(["inspect", str(exported_external)]) == 0
    out = capsys.readouterr().out
    assert "int4 gate" in out and "MatMulNBits" in out
    assert f"{graph_bytes(exported_external / 'decoder.onnx') / 2**20:.2f} MiB" in out
    assert graph_bytes(exported_external / "decoder.onnx") > 5 * (exported_external / "decoder.onnx").stat().st_size


def test_per_tensor_external_data_is_gathered_into_one_file(ckpt, tmp_path):
    """What torch's exporter writes above 2 GB (one file per tensor) becomes one page-aligned data file."""
    from bard_deploy.checkpoint import load_model
    from bard_deploy.converters.onnx_export import export_decoder
    from bard_deploy.onnx_files import gather_external_data
    from bard_deploy.runtimes.ort_backend import run, session
    model = load_model(ckpt)
    io = export_decoder(model, tmp_path / "decoder.onnx")
    ref = run(session(tmp_path / "decoder.onnx"), io.output_names, io.dummy_feeds(1, 3, 2))
    proto = onnx.load(str(tmp_path / "decoder.onnx"))
    (tmp_path / "decoder.onnx").unlink()
    # Constant nodes' tensors external too (convert_attribute), as onnxruntime's quantizers write them
    onnx.save_model(proto, str(tmp_path / "decoder.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0, convert_attribute=True)
    pieces = [p for p in tmp_path.iterdir() if p.name != "decoder.onnx"]
    assert len(pieces) > 10
    saved = onnx.load(str(tmp_path / "decoder.onnx"), load_external_data=False)
    assert any(a.t.data_location == onnx.TensorProto.EXTERNAL for n in saved.graph.node for a in n.attribute
               if a.HasField("t"))                                      # the case that broke INT4 at real size
    gather_external_data(tmp_path / "decoder.onnx", pieces)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    got = run(session(tmp_path / "decoder.onnx"), io.output_names, io.dummy_feeds(1, 3, 2))
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_bard_vl_checkpoint_exports_with_its_block_size(tmp_path):
    from bard_deploy.standins import write_standin
    src = write_standin(tmp_path / "bard-vl", "tiny", bard_vl=True)
    with pytest.raises(ExportError, match="--block-size"):
        export(src, tmp_path / "no-block", **QUIET)                   # refused before any graph is written
    assert not (tmp_path / "no-block").exists()
    m = export(src, tmp_path / "ex", block_size=4, **QUIET)
    assert m.block_size == 4 and m.mask_token_id == 151671 and m.vision.grid_thw == [1, 32, 32]
    pipe = Pipeline.load(tmp_path / "ex")                             # the export's config has its bard section
    assert pipe.config.bard.prompt_attention == "block" and pipe.config.bard.block_size == 4
    assert len(pipe.generate("Describe the picture.", max_new_tokens=8).token_ids) == 8


def test_onnxruntime_errors_are_typed(exported):
    from bard_deploy.errors import RuntimeInputError
    from bard_deploy.runtimes.ort_backend import run, session
    sess = session(exported / "vision.onnx")
    with pytest.raises(RuntimeInputError, match="onnxruntime refused the inputs"):
        run(sess, ["image_embeds"], {"pixel_values": torch.zeros(3, 5)})              # inputs missing
    with pytest.raises(RuntimeInputError, match="onnxruntime refused the inputs"):
        run(sess, ["image_embeds"], {"pixel_values": torch.zeros(3, 5), "interp_indices": torch.zeros(3, 4).long(),
                                     "interp_weights": torch.zeros(3, 4),
                                     "vision_position_ids": torch.zeros(3, 2).long()})
    (exported.parent / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="cannot load bad.onnx"):
        session(exported.parent / "bad.onnx")


def _chat_jsonl(path, n):
    """n synthetic rows as the chat JSONL of `train --data` (images as files beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = make_sample(100 + i)
        s.image().save(path.parent / f"img{i}.png")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                                              {"type": "text", "text": s.question}]},
                                  {"role": "assistant", "content": s.answer}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_real_model_is_calibrated_and_gated_on_the_users_data(tmp_path, capsys):
    from bard_deploy.standins import write_standin
    src = write_standin(tmp_path / "qwen3-vl", "tiny")
    data = _chat_jsonl(tmp_path / "data" / "rows.jsonl", 12)
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "no"), "--int4"]) == 2
    assert "--calib-data" in capsys.readouterr().err                      # no data, no quantized variant
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "ex"), "--int8", "--int4", "--calib-data",
                 str(data), "--calibration-samples", "4", "--gate-top1", "0", "--gate-token-agreement", "0"]) == 0
    m = json.loads((tmp_path / "ex" / "manifest.json").read_text())
    for variant in ("int8", "int4"):
        g = m[variant]
        assert g["score"] == "token_agreement" and 0 <= g["token_agreement"] <= 1 and "exact_match_fp32" not in g
        assert g["eval_samples"] == 12 - 3 - 4 - 4                     # the rows left after validation, calibration
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ex.calibration.safetensors"), "pt") as f:         # beside the bundle
        assert "rows.jsonl" in json.loads(f.metadata()["meta"])["source"]    # calibrated on the user's rows
    from bard_deploy.calibration.prompts import ExportPrompts
    with pytest.raises(BardError, match="needs at least"):
        ExportPrompts.from_jsonl(data, calibration_samples=16)


def test_token_agreement():
    from bard_deploy.calibration.gate import token_agreement
    assert token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 9, 3]]) == 0.5                # position by position, of fp32's


def test_fp16_graphs_validate_and_decode_like_fp16_pytorch(ckpt, tmp_path):
    """`export --dtype fp16` (GPU targets): half-precision graphs with fp16 IO, validated against the model in fp16
    PyTorch; onnxruntime decodes them (its CPU provider has fp16 kernels) as the fp16 torch backend does. Quantized
    variants are built from fp32 graphs only."""
    out = tmp_path / "fp16"
    m = export(ckpt, out, dtype="fp16", **QUIET)
    assert m.float_dtype == "float16" and m.base_variant == "fp16" and m.variants == ["fp16"]
    assert m.parity["tolerance"] > 0 and all(d <= m.parity["tolerance"] for d in m.parity["decoder"].values())
    assert m.parity["vision"] and max(m.parity["vision"].values()) <= m.parity["tolerance"]
    assert {d for _, d, _ in m.io["inputs"]} == {"float16", "int64"}
    proto = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    s = make_sample(2)
    ref = Pipeline.load(ckpt, dtype="fp16").generate(s.question, images=[s.image()], max_new_tokens=12)
    got = Pipeline.load(out).generate(s.question, images=[s.image()], max_new_tokens=12)
    agree = sum(a == b for a, b in zip(got.token_ids, ref.token_ids, strict=False)) / len(ref.token_ids)
    assert agree >= 0.75, (got.token_ids, ref.token_ids)
    with pytest.raises(ExportError, match="quantize the fp32 graph"):
        export(ckpt, tmp_path / "no", dtype="fp16", int4=True, **QUIET)
    with pytest.raises(ExportError, match="--dtype must be one of"):
        export(ckpt, tmp_path / "no", dtype="bf16", **QUIET)


def test_lean_dynamic_int8_is_ort_s_own(exported_external, tmp_path):
    """The lean INT8 path (one copy of the graph in memory) writes the graph onnxruntime's quantize_dynamic writes
    with the same settings: same nodes, same initializers, byte for byte, with and without excluded nodes."""
    import shutil

    import numpy as np
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from bard_deploy.calibration.quantize import lm_head_matmuls, quantize_dynamic_lean

    d = tmp_path / "g"
    d.mkdir()
    for name in ("decoder.onnx", "decoder.onnx.data", "embeddings.safetensors"):
        shutil.copy(exported_external / name, d / name)
    for exclude in ([], lm_head_matmuls(d / "decoder.onnx")):
        quantize_dynamic(str(d / "decoder.onnx"), str(tmp_path / "ort.onnx"), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], reduce_range=True, per_channel=True,
                         nodes_to_exclude=exclude, use_external_data_format=False)
        quantize_dynamic_lean(d / "decoder.onnx", tmp_path / "lean.onnx", exclude, external=False)
        a, b = (onnx.load(str(tmp_path / n)).graph for n in ("ort.onnx", "lean.onnx"))
        assert [(n.op_type, n.name, list(n.input)) for n in a.node] == [(n.op_type, n.name, list(n.input))
                                                                         for n in b.node]
        ia, ib = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in (a, b))
        assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)
        assert sum(n.op_type == "MatMulInteger" for n in b.node) > 0


def test_per_token_int8_quantizes_each_token_on_its_own(tmp_path):
    """per_token_activations on a bare MatMul: onnxruntime's per-tensor scale loses a small token beside a large
    one (up to 100 % error), per token every token keeps ~1-2 % and its output is bitwise the same alone (the
    fused MatMulIntegerToFloat onnxruntime makes of it applies the per-token scale row by row)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from bard_deploy.calibration.quantize import per_token_activations, quantize_dynamic_lean
    from bard_deploy.runtimes.ort_backend import session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", 48])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "f.onnx")
    quantize_dynamic_lean(tmp_path / "f.onnx", tmp_path / "tensor.onnx", [], external=False)
    quantize_dynamic_lean(tmp_path / "f.onnx", tmp_path / "token.onnx", [], external=False)
    assert per_token_activations(tmp_path / "token.onnx") == 1
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    x[1] *= 100
    x[0, 1] *= 0.01
    ref = x @ w
    err = {}
    for name in ("tensor", "token"):
        s = session(tmp_path / f"{name}.onnx")
        y = s.run(None, {"x": x})[0]
        err[name] = (np.abs(y - ref) / np.abs(ref).max(-1, keepdims=True)).max(-1)
        if name == "token":
            assert np.array_equal(s.run(None, {"x": x[:1, 1:2]})[0], y[:1, 1:2])
    assert err["token"].max() < 0.05 and err["tensor"][0].max() > 0.3


def test_the_fused_head_returns_what_greedy_decoding_reads(ckpt, exported, monkeypatch):
    """The graph's fused greedy head (arg-max ids and probabilities, MASK suppressed) equals the host computation
    from its full logits; greedy decoding asks for it instead of the logits (B x K values, not B x K x vocab) and
    decodes the same tokens as from the logits and as torch."""
    from bard_deploy.runtimes.ort_backend import OrtBackend

    ort = OrtBackend(exported, variant="fp32")
    io = ort.io
    assert io.fused_head and io.greedy_outputs() == [n for n in io.output_names if n != iospec.LOGITS]
    feeds = io.dummy_feeds(batch=2, seq=5, past=3)
    out = ort.step(feeds)
    logits = out[iospec.LOGITS].clone()
    logits[..., ort.config.bard.mask_token_id] = float("-inf")
    probs = torch.softmax(logits, -1)
    assert torch.equal(out[iospec.TOP_IDS], probs.argmax(-1))
    assert torch.allclose(out[iospec.TOP_PROBS], probs.max(-1).values, atol=1e-6)
    only = ort.step(feeds, io.greedy_outputs())
    assert iospec.LOGITS not in only and torch.equal(only[iospec.TOP_IDS], out[iospec.TOP_IDS])

    asked = []
    step = OrtBackend.step
    monkeypatch.setattr(OrtBackend, "step",
                        lambda self, f, outputs=None, binding=None: asked.append(outputs) or step(self, f, outputs,
                                                                                                binding))
    s = make_sample(6)
    ref = Pipeline.load(ckpt).generate(s.question, images=[s.image()], max_new_tokens=12).token_ids
    fused = Pipeline.load(exported, variant="fp32").generate(s.question, images=[s.image()], max_new_tokens=12)
    assert fused.token_ids == ref and asked and all(a == io.greedy_outputs() for a in asked)
    asked.clear()
    monkeypatch.setattr(OrtBackend, "takes_outputs", False)                # a backend without the fused path
    unfused = Pipeline.load(exported, variant="fp32").generate(s.question, images=[s.image()], max_new_tokens=12)
    assert unfused.token_ids == ref and all(a is None for a in asked)
    sampled = Pipeline.load(exported, variant="fp32")
    monkeypatch.setattr(OrtBackend, "takes_outputs", True)
    asked.clear()
    sampled.generate(s.question, images=[s.image()], max_new_tokens=8, temperature=0.7, seed=1)
    assert asked and all(a is None for a in asked)                          # sampling reads the full logits


def _photo(w: int, h: int, seed: int = 0):
    """A random RGB picture of w x h pixels (noise: every patch differs)."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def test_the_vision_graph_takes_any_grid_and_was_validated_at_several(ckpt, exported):
    """One vision graph for every image size: the export validated it against PyTorch at >= 3 grids (non-square
    among them, up to the budget's largest), and onnxruntime decodes images of any size and aspect, several in one
    prompt, to exactly the torch tokens (equal image tokens on both backends)."""
    m = json.loads((exported / "manifest.json").read_text())
    grids = m["vision"]["validated_grids"]
    assert len(grids) >= 3 and any(h != w for _, h, w in grids)
    assert max(h * w for _, h, w in grids) * 16 ** 2 >= 0.75 * 36864         # the budget's largest (192 x 192)
    assert max(m["parity"]["vision"].values()) <= m["parity"]["tolerance"]
    ops = {n.op_type for n in onnx.load(str(exported / "vision.onnx"), load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops          # the fused (flash) attention on CPU
    torch_pipe, ort_pipe = Pipeline.load(ckpt), Pipeline.load(exported, variant="fp32")
    grids_seen = set()
    for images in ([_photo(96, 96)], [_photo(200, 100, 1)], [_photo(64, 192, 2)], [_photo(4000, 3000, 3)],
                   [_photo(120, 80, 4), _photo(60, 150, 5)]):
        enc = ort_pipe.encoder.encode(ort_pipe._messages("What is this?", None, images))
        grids_seen |= {tuple(g) for g in enc.image_grid_thw.tolist()}
        want = torch_pipe.generate("What is this?", images=images, max_new_tokens=8).token_ids
        got = ort_pipe.generate("What is this?", images=images, max_new_tokens=8)
        assert got.token_ids == want, images
        assert got.stats.image_tokens == sum(t * h * w // 4 for t, h, w in enc.image_grid_thw.tolist())
        assert got.stats.vision_s > 0 and got.stats.as_dict()["image_tokens"] == got.stats.image_tokens
        feats_t = torch_pipe.backend.encode_images(enc.pixel_values, enc.image_grid_thw)
        feats_o = ort_pipe.backend.encode_images(enc.pixel_values, enc.image_grid_thw)
        assert all((a - b).abs().max() <= 1e-4 for a, b in zip(feats_t, feats_o, strict=True))
    assert len(grids_seen) >= 5


def test_video_frames_decode_alike_on_both_backends(ckpt, exported, capsys):
    """A video (a list of frames) is laid out as Qwen3-VL's processor lays it out: one "<t seconds>" text and one
    run of video pads per temporal patch (two frames), the last frame repeated for an odd count; onnxruntime
    encodes it one temporal patch at a time and gives exactly the torch tokens and features, with an image
    beside it in the same prompt."""
    from bard_deploy.video import timestamp_text

    torch_pipe, ort_pipe = Pipeline.load(ckpt), Pipeline.load(exported, variant="fp32")
    frames = [_photo(160, 96, 10 + i) for i in range(5)]
    video = {"video": frames, "fps": 4.0}
    enc = ort_pipe.encoder.encode(ort_pipe._messages("What happens?", None, [_photo(96, 64, 9)], [video]))
    (_, ih, iw), (t, h, w) = enc.image_grid_thw.tolist()
    assert t == 3                                                     # 5 frames -> 3 temporal patches
    tok, cfg = ort_pipe.tokenizer, ort_pipe.config
    ids = enc.input_ids
    assert ids.count(cfg.video_token_id) == t * h * w // 4 and ids.count(cfg.image_token_id) == ih * iw // 4
    assert ids.count(cfg.vision_start_token_id) == 1 + t               # one image, one run per temporal patch
    stamps = [timestamp_text(s) for s in ort_pipe.encoder.video.processor.timestamps(5, 4.0)]
    assert stamps == ["<0.1 seconds>", "<0.6 seconds>", "<1.0 seconds>"]
    first = tok(stamps[0], add_special_tokens=False)["input_ids"]
    at = ids.index(cfg.video_token_id)
    assert ids[at - 1 - len(first):at - 1] == first and ids[at - 1] == cfg.vision_start_token_id
    feats_t = torch_pipe.backend.encode_images(enc.pixel_values, enc.image_grid_thw)
    feats_o = ort_pipe.backend.encode_images(enc.pixel_values, enc.image_grid_thw)
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(feats_t, feats_o, strict=True))
    kwargs = dict(images=[_photo(96, 64, 9)], videos=[video], max_new_tokens=8)
    want = torch_pipe.generate("What happens?", **kwargs)
    got = ort_pipe.generate("What happens?", **kwargs)
    assert got.token_ids == want.token_ids and got.stats.image_tokens == (t * h * w + ih * iw) // 4
    assert "".join(ort_pipe.stream("What happens?", **kwargs)) == got.text
    folder = exported.parent / "frames"                                # generate --video: a folder of frames
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(frames):
        f.save(folder / f"{i:03d}.png")
    capsys.readouterr()
    assert main(["generate", "--prompt", "What happens?", "--model", str(exported), "--video", str(folder),
                 "--video-fps", "4", "--variant", "fp32", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ort_pipe.generate("What happens?", videos=[video], max_new_tokens=8).token_ids


def test_bad_videos_are_one_line_errors(exported):
    """A video file path, one frame, frames of two sizes, a bad fps: typed errors naming the problem."""
    from bard_deploy.errors import DataError

    pipe = Pipeline.load(exported, variant="fp32")
    for video, match in ((["a.mp4"], "not found"), ("clip.mp4", "must be a list of frames"),
                         ([_photo(64, 64)], "needs 2 to 768 frames"),
                         ([_photo(64, 64), _photo(32, 64)], "share one size"),
                         ({"video": [_photo(64, 64)] * 2, "fps": 0}, "fps must be a number")):
        with pytest.raises(DataError, match=match):
            pipe.generate("What?", videos=[video], max_new_tokens=2)


def test_a_pixel_budget_resizes_images_into_it(ckpt, tmp_path):
    """--max-pixels / --min-pixels go into the export's processor: a large photo is resized into the budget (as
    the processor resizes, never refused), a tiny one up to the minimum; bad budgets are typed errors."""
    m = export(ckpt, tmp_path / "ex", max_pixels=64 * 64, min_pixels=32 * 32, **QUIET)
    assert max(h * w for _, h, w in m.vision.validated_grids) * 256 <= 64 * 64
    pipe = Pipeline.load(tmp_path / "ex")
    for size in ((4000, 3000), (20, 20)):
        (t, h, w), = pipe.encoder.encode(pipe._messages("What?", None, [_photo(*size)])).image_grid_thw.tolist()
        assert 32 * 32 <= t * h * w * 256 <= 64 * 64, size
    assert len(pipe.generate("What?", images=[_photo(4000, 3000)], max_new_tokens=4).token_ids) == 4
    with pytest.raises(ExportError, match="--max-pixels must be an integer >= 1024"):
        export(ckpt, tmp_path / "bad", max_pixels=100, **QUIET)
    with pytest.raises(ExportError, match="above --max-pixels"):
        export(ckpt, tmp_path / "bad", min_pixels=128 * 128, max_pixels=64 * 64, **QUIET)


def test_a_requested_execution_provider_that_is_absent_is_an_error(exported):
    """device="cuda" without onnxruntime-gpu is a one-line typed error, never a quiet CPU run."""
    import onnxruntime as ort

    from bard_deploy.errors import RuntimeInputError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    with pytest.raises(RuntimeInputError, match="no CUDAExecutionProvider"):
        Pipeline.load(exported, device="cuda")


def test_a_run_time_pixel_budget(exported, capsys):
    """Pipeline.load(max_pixels=...) / generate --max-pixels resize into the given budget on the export; a bad
    budget is a typed one-line error."""
    from bard_deploy.errors import DataError

    pipe = Pipeline.load(exported, max_pixels=64 * 64, min_pixels=32 * 32)
    (t, h, w), = pipe.encoder.encode(pipe._messages("What?", None, [_photo(4000, 3000)])).image_grid_thw.tolist()
    assert 32 * 32 <= t * h * w * 256 <= 64 * 64
    with pytest.raises(DataError, match="max_pixels must be an integer >= 1024"):
        Pipeline.load(exported, max_pixels=10)
    img = exported.parent / "big.png"
    _photo(1200, 900).save(img)
    assert main(["generate", "--prompt", "What?", "--model", str(exported), "--image", str(img), "--max-pixels",
                 "4096", "--max-new-tokens", "4", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "image_tokens" in out and "vision_s" in out


def test_a_bundle_trimmed_to_one_variant_loads_and_inspect_lists_what_it_needs(exported, tmp_path, capsys):
    """The files a runtime needs per variant (Manifest.runtime_files; inspect lists them): a copy holding only
    the INT8 ones decodes as the full bundle does; a needed file missing or a tampered one is still refused."""
    import shutil

    from bard_deploy.manifest import MANIFEST, Manifest

    m = Manifest.read(exported)
    need = m.runtime_files("int8")
    assert "decoder.int8.onnx" in need and "decoder.onnx" not in need and m.embeddings in need
    trimmed = tmp_path / "int8-only"
    trimmed.mkdir()
    for name in need + [MANIFEST]:
        shutil.copy(exported / name, trimmed / name)
    s = make_sample(2)
    want = Pipeline.load(exported, variant="int8").generate(s.question, images=[s.image()], max_new_tokens=6)
    assert Pipeline.load(trimmed, variant="int8").generate(s.question, images=[s.image()],
                                                          max_new_tokens=6).token_ids == want.token_ids
    with pytest.raises(ExportError, match="decoder.onnx listed in the manifest is missing"):
        Pipeline.load(trimmed, variant="fp32")
    assert main(["inspect", str(trimmed)]) == 0
    out = capsys.readouterr().out
    assert "run-time files per variant" in out and "complete" in out and "missing decoder.onnx" in out
    assert "beside the bundle" in out
    (trimmed / "config.json").write_text((trimmed / "config.json").read_text() + " ")
    with pytest.raises(ExportError, match="config.json does not match its sha256"):
        Pipeline.load(trimmed, variant="int8")
