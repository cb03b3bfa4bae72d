"""Bench: statistics from recorded timings, the JSON line and its keys, a tiny end-to-end bench, EOS counting."""

import json

import pytest

from bard_deploy.bench import BenchOptions, Request, Summary, bench, merge_repeats, percentile, plot_curves
from bard_deploy.cli import main
from bard_deploy.embedded import new_checkpoint
from bard_deploy.errors import RuntimeInputError

SIZES = dict(hidden=64, layers=2)
ROW_KEYS = {"name", "block_size", "threshold", "requests", "exact_match", "tokens", "nfe", "tokens_per_forward",
            "nfe_per_token", "steps_per_block", "ttft_ms", "step_ms_p50", "step_ms_p90", "step_ms_p99", "prefill_ms",
            "vision_ms", "decode_tokens_per_s", "e2e_tokens_per_s", "peak_rss_mb", "speedup_decode_vs_ar",
            "speedup_e2e_vs_ar", "backend_ms_per_step", "host_ms_per_step", "host_fraction", "image_tokens"}


def small_shape(tmp_path, layers: int):
    """A bench-step --shape config.json of a tiny decoder with `layers` layers."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": layers, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 500}))
    return cfg


def replay_bench(tmp_path, capsys) -> tuple[dict, dict]:
    """bench-step --replay of tmp_path/b/trace.json on a 2-layer shape: its JSON line and its one replay row."""
    cfg = small_shape(tmp_path, 2)
    assert main(["bench-step", "--shape", str(cfg), "--tokens", "1", "--past", "8", "--full-depth", "--repeats", "1",
                 "--backends", "onnxruntime-fp32", "--replay", str(tmp_path / "b" / "trace.json"),
                 "--prompt-tokens", "40", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (r,) = out["replay"]
    return out, r


def test_percentiles():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(101))), 90) == 90.0
    assert percentile([1.0, 2.0], 50) == 1.5 and percentile([], 50) == 0.0


def test_statistics_from_synthetic_timings():
    # request 1: 2 blocks (3 + 2 steps), 8 tokens; request 2: 1 block of 4 steps, 3 tokens (stopped at EOS)
    r1 = Request(8, 6, 0.010, 0.004, 0.050, [0.01, 0.01, 0.01, 0.01, 0.01], [3, 2], True)
    r2 = Request(3, 5, 0.020, 0.006, 0.040, [0.01, 0.01, 0.01, 0.01], [4], False)
    d = Summary("x", 4, 0.9, [r1, r2]).as_dict()
    assert d["tokens"] == 11 and d["nfe"] == 11
    assert d["tokens_per_forward"] == 1.0 and d["nfe_per_token"] == 1.0
    assert d["exact_match"] == 0.5 and d["steps_per_block"] == 3.0
    assert d["decode_tokens_per_s"] == pytest.approx(11 / 0.090, rel=1e-3)
    assert d["e2e_tokens_per_s"] == pytest.approx(11 / 0.120, rel=1e-3)
    assert d["ttft_ms"] == pytest.approx(1e3 * (0.040 + 0.060) / 2)      # median of prefill + first block
    assert d["step_ms_p50"] == 10.0 and d["prefill_ms"] == 15.0 and d["vision_ms"] == 5.0
    ar = Request(5, 5, 0.010, 0.0, 0.040, [0.01] * 4, [], True)
    assert Summary("ar", None, None, [ar]).as_dict()["ttft_ms"] == 10.0      # AR: the prefill yields token 1
    untimed = Request(5, 5, 0.010, 0.0, 0.040, [], [], True)                # one generate() call: no step times
    d = Summary("hf", None, None, [untimed]).as_dict()
    assert d["step_ms_p50"] is None and d["step_ms_p99"] is None and d["decode_tokens_per_s"] == 125.0
    assert d["backend_ms_per_step"] is None and d["host_fraction"] is None


def test_host_time_is_decode_wall_minus_backend_time():
    # 4 steps of 10 ms wall, 8 ms of it in the backend, plus 10 ms of loop work outside the steps: 50 ms decode
    r = Request(4, 5, 0.010, 0.0, 0.050, [0.01] * 4, [4], True, [0.008] * 4)
    d = Summary("x", 4, 0.9, [r, r]).as_dict()
    assert d["backend_ms_per_step"] == 8.0
    assert d["host_ms_per_step"] == pytest.approx(1e3 * (0.050 - 0.032) / 4)
    assert d["host_fraction"] == pytest.approx(0.018 / 0.050, abs=1e-4)


def test_repeats_report_the_median_and_the_spread_of_per_repeat_speedups():
    def row(tps, e2e=None):
        return {"decode_tokens_per_s": tps, "e2e_tokens_per_s": e2e or tps, "name": str(tps)}

    ar = [row(100), row(50), row(100)]                  # the second repeat ran on a busy machine, for both
    bard = [row(400), row(210), row(380)]
    ar_row, bard_row = merge_repeats([ar, bard])
    assert ar_row["speedup_decode_vs_ar"] == 1.0 and ar_row["decode_tokens_per_s"] == 100
    assert bard_row["speedup_decode_vs_ar"] == 4.0       # median of 4.0, 4.2, 3.8: ratios per repeat, not of medians
    assert bard_row["decode_tokens_per_s"] == 380 and bard_row["name"] == "380"     # the median repeat's row
    assert bard_row["repeats"]["speedup_decode_vs_ar"] == [4.0, 4.2, 3.8]
    assert bard_row["repeats"]["speedup_max_over_min"] == round(4.2 / 3.8, 3)
    assert bard_row["repeats"]["decode_tokens_per_s_max_over_min"] == round(400 / 210, 3)
    assert "repeats" not in merge_repeats([[row(1)], [row(2)]])[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    src = new_checkpoint(root / "source", **SIZES)
    b4 = new_checkpoint(root / "b4", bard={"block_size": 4, "source_model": str(src)}, **SIZES)
    return src, b4, root


def test_tiny_bench_end_to_end(run):
    src, b4, root = run
    res = bench(BenchOptions((b4,), thresholds=(0.5, 0.9), requests=3, warmup=1, max_new_tokens=12, out=root / "out"),
                log=lambda *a: None)
    names = [r["name"] for r in res["rows"]]
    assert names == ["AR baseline", "BARD b4", "BARD b4", "transformers generate (AR)"]
    for r in res["rows"]:
        assert ROW_KEYS <= set(r) and r["requests"] == 3
        assert r["tokens"] <= 3 * 12                                   # nothing counted past max_new / EOS
    assert res["rows"][0]["speedup_decode_vs_ar"] == 1.0
    assert (root / "out" / "bench.png").stat().st_size > 5000
    header = json.loads((root / "out" / "bench.json").read_text())["header"]
    assert header["backend"] == "torch" and header["threads"]["backend"] == header["threads"]["host"] >= 1


def test_the_baseline_runs_on_the_backend_and_variant_bard_runs_on(run, tmp_path):
    """An export's AR baseline is the source's export: the recorded torch source is refused, and so is a mixed
    pair; the source path recorded relative to the checkpoint is found from any working directory."""
    from bard_deploy.converters.export import export
    from bard_deploy.errors import RuntimeInputError

    src, b4, root = run
    ex = tmp_path / "b4-export"
    export(b4, ex, log=lambda *a: None)
    opts = dict(requests=1, warmup=0, max_new_tokens=4, transformers_baseline=False, write=False)
    with pytest.raises(RuntimeInputError, match="same backend and variant.*the AR source's export"):
        bench(BenchOptions((ex,), **opts), log=lambda *a: None)
    with pytest.raises(RuntimeInputError, match="same backend and variant"):
        bench(BenchOptions((b4,), ar_model=ex, **opts), log=lambda *a: None)
    rel = new_checkpoint(root / "rel" / "b4", bard={"block_size": 4, "source_model": "../../source"}, **SIZES)
    res = bench(BenchOptions((rel,), **opts), log=lambda *a: None)
    assert res["rows"][0]["name"] == "AR baseline"


def test_the_thread_policy(run, tmp_path):
    """onnxruntime gets the cores and torch one thread for the host work; torch alone gets them all; a bad count
    is a typed error. Decoding applies the pipeline's policy to torch."""
    import torch

    from bard_deploy.converters.export import export
    from bard_deploy.errors import RuntimeInputError
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.threads import Threads, available_cores

    assert Threads.policy("onnxruntime", 3) == Threads(3, 1) and Threads.policy("torch", 3) == Threads(3, 3)
    assert Threads.policy("onnxruntime") == Threads(available_cores(), 1)
    # by default one thread per 64 MiB of weights, within 1 .. the cores; an explicit count is used as given
    assert Threads.policy("onnxruntime", None, 5 * 2**20) == Threads(1, 1)
    assert Threads.policy("torch", None, 5 * 2**20) == Threads(1, 1)
    assert Threads.policy("onnxruntime", None, 8 * 2**30) == Threads(available_cores(), 1)
    assert Threads.policy("onnxruntime", 2, 5 * 2**20) == Threads(2, 1)
    with pytest.raises(RuntimeInputError, match="threads must be a positive integer"):
        Threads.policy("torch", 0)
    _, b4, _ = run
    export(b4, tmp_path / "ex", log=lambda *a: None)
    before = torch.get_num_threads()
    try:
        pipe = Pipeline.load(tmp_path / "ex", threads=1)
        assert pipe.threads == Threads(1, 1)
        assert pipe.backend.decoder.get_session_options().intra_op_num_threads == 1
        pipe.generate("Describe the picture.", max_new_tokens=4)
        assert torch.get_num_threads() == 1
        Pipeline.load(b4, threads=2).generate("Describe the picture.", max_new_tokens=4)
        assert torch.get_num_threads() == 2
        assert Pipeline.load(tmp_path / "ex").threads == Threads(1, 1)         # a 0.3 MB model: one thread
    finally:
        torch.set_num_threads(before)


def test_cli_bench_last_line_is_json(run, capsys):
    _, b4, root = run
    assert main(["bench", "--model", str(b4), "--requests", "2", "--warmup", "0", "--max-new-tokens", "8",
                 "--no-transformers", "--out", str(root / "cli")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    obj = json.loads(last)
    assert {"header", "rows", "plot"} <= set(obj) and ROW_KEYS <= set(obj["rows"][1])
    assert {"machine", "backend", "torch", "onnxruntime", "transformers", "threads", "repeats"} <= set(obj["header"])


def test_tokens_after_eos_are_not_counted(run):
    """An EOS in the middle of a block: the tokens after it are dropped from the count."""
    from bard_deploy.runtimes.api import Pipeline
    _, b4, _ = run
    pipe = Pipeline.load(b4)
    free = pipe.generate("Describe the picture.", max_new_tokens=12, threshold=0.9)
    eos = free.token_ids[5]
    first = free.token_ids.index(eos)
    pipe.eos_ids = [eos]
    g = pipe.generate("Describe the picture.", max_new_tokens=12, threshold=0.9)
    assert g.stats.tokens == [first + 1] and len(g.token_ids) == first + 1


def test_step_rows_extrapolate_and_flag_noise():
    from bard_deploy.bench_step import shape_config, step_rows

    dims = shape_config("qwen3-vl-2b")
    # torch: 1 layer 10 ms, 2 layers 12 ms at T=1 -> 28 layers: 10 + 27 * 2 = 64 ms; T=4 twice that
    # ort: more layers timed *faster* and extrapolated below zero -> unreliable, no ratio, no bandwidth
    raw = {("torch", 1, 1): 0.010, ("torch", 2, 1): 0.012, ("torch", 1, 4): 0.020, ("torch", 2, 4): 0.024,
           ("ort", 1, 1): 0.010, ("ort", 2, 1): 0.009, ("ort", 1, 4): 0.010, ("ort", 2, 4): 0.011}
    rows = {(r["backend"], r["T"]): r for r in step_rows(raw, ["torch", "ort"], [1, 4], (1, 2), 28, 512, dims)}
    assert rows["torch", 1]["ms_per_step"] == 64.0 and rows["torch", 4]["ms_per_token"] == 32.0
    assert rows["torch", 4]["cost_vs_T1"] == 2.0 and rows["torch", 1]["reliable"]
    bad = rows["ort", 1]
    assert bad["ms_per_step"] < 0 and not bad["reliable"] and bad["cost_vs_T1"] is None and bad["weight_GBps"] is None
    assert rows["ort", 4]["cost_vs_T1"] is None                       # its T=1 reference is noise


def test_step_mode_on_a_small_shape(tmp_path, capsys):
    cfg = small_shape(tmp_path, 6)
    assert main(["bench-step", "--shape", str(cfg), "--tokens", "1,4", "--past", "16", "--layers-subset", "1,2",
                 "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {r["backend"] for r in res["rows"]} == {"torch", "onnxruntime-fp32", "onnxruntime-int8"}
    assert all({"ms_per_step", "ms_per_token", "weight_GBps", "cost_vs_T1", "reliable"} <= set(r) for r in res["rows"])
    assert "extrapolated linearly to 6 layers" in res["note"]


def test_step_mode_times_int4_when_asked(tmp_path, capsys):
    cfg = small_shape(tmp_path, 4)
    assert main(["bench-step", "--shape", str(cfg), "--tokens", "1", "--past", "8", "--layers-subset", "1,2",
                 "--backends", "onnxruntime-fp32,onnxruntime-int4", "--repeats", "2", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["backend"] for r in res["rows"]] == ["onnxruntime-fp32", "onnxruntime-int4"]
    assert main(["bench-step", "--backends", "onnxruntime-int3"]) == 2
    assert "onnxruntime-int3" in capsys.readouterr().err


def test_step_mode_at_full_depth_has_no_extrapolation(tmp_path, capsys):
    cfg = small_shape(tmp_path, 3)
    assert main(["bench-step", "--shape", str(cfg), "--tokens", "1,4", "--past", "8", "--full-depth",
                 "--backends", "torch,onnxruntime-fp32", "--repeats", "2", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "full depth (3 layers)" in res["note"]
    for r in res["rows"]:
        assert r["ms_per_step"] == r["ms_measured_3_layers"] and r["reliable"]


def test_bench_writes_the_commit_trace_and_the_replay_follows_it(run, tmp_path, capsys, monkeypatch):
    """bench's trace.json holds per configuration and request the tokens and steps per block; bench-step --replay
    drives exactly those steps through the loop (counted at the backend), AR one token a step, BARD's first step of
    every later block carrying the previous block, and says it is a replay."""
    from bard_deploy.runtimes.ort_backend import OrtBackend

    src, b4, root = run
    res = bench(BenchOptions((b4,), thresholds=(0.5,), requests=3, warmup=0, max_new_tokens=12, out=tmp_path / "b",
                             transformers_baseline=False), log=lambda *a: None)
    trace = json.loads((tmp_path / "b" / "trace.json").read_text())
    ar, bard = trace["configs"]
    assert ar["name"] == "AR baseline" and bard["block_size"] == 4 and bard["threshold"] == 0.5
    assert sum(r["tokens"] for r in bard["requests"]) == res["rows"][1]["tokens"]
    assert sum(sum(r["steps_per_block"]) for r in bard["requests"]) == res["rows"][1]["nfe"] - 3
    calls = []
    step = OrtBackend.step

    def counted(self, feeds, outputs=None, binding=None):
        calls.append(feeds["inputs_embeds"].shape[1])
        return step(self, feeds, outputs, binding)

    monkeypatch.setattr(OrtBackend, "step", counted)
    out, r = replay_bench(tmp_path, capsys)
    assert out["replay_note"].startswith("a REPLAY") and r["replay"] and r["prompt_tokens"] == 40
    ar_steps = sum(x["tokens"] - 1 for x in ar["requests"])
    bard_steps = sum(sum(x["steps_per_block"]) for x in bard["requests"])
    assert r["ar"]["steps"] == ar_steps and r["bard"]["steps"] == bard_steps
    later_blocks = sum(len(x["steps_per_block"]) - 1 for x in bard["requests"])
    assert calls.count(1) == ar_steps and calls.count(8) == later_blocks
    assert calls.count(4) == bard_steps - later_blocks
    assert r["speedup_decode_vs_ar"] == pytest.approx(r["bard"]["decode_tokens_per_s"] / r["ar"]["decode_tokens_per_s"],
                                                      rel=1e-2)
    with pytest.raises(Exception, match="exactly one BARD configuration at threshold 0.7"):
        from bard_deploy.replay import read_trace
        read_trace(tmp_path / "b" / "trace.json", 0.7)


def test_the_loop_step_is_timed_against_the_bare_graph(tmp_path, capsys):
    cfg = small_shape(tmp_path, 2)
    assert main(["bench-step", "--shape", str(cfg), "--tokens", "1,4", "--past", "300", "--full-depth",
                 "--repeats", "2", "--backends", "onnxruntime-fp32", "--loop", "--out", str(tmp_path)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["T"], r["past"]) for r in res["loop"]] == [(1, 300), (4, 300)]
    for r in res["loop"]:
        assert r["bare_ms"] > 0 and r["loop_ms"] > 0 and r["cache_columns"] == 300 + r["T"]
        rounding = 0.01 * (1 + r["loop_ms"] / r["bare_ms"]) / r["bare_ms"]        # both are rounded to 0.01 ms
        assert r["loop_over_bare"] == pytest.approx(r["loop_ms"] / r["bare_ms"] - 1, abs=rounding + 1e-3)


def test_a_speculative_bench_row_is_lossless_and_reports_its_rounds(run, capsys):
    """bench --speculative source: beside each BARD row a SPEC row (the AR baseline's backend verifies), whose
    answers must equal AR's request by request (bench raises otherwise), with kept tokens per round and the
    draft / verify cost per round."""
    src, b4, root = run
    res = bench(BenchOptions((b4,), thresholds=(0.9,), requests=3, warmup=1, max_new_tokens=12, speculative="source",
                             transformers_baseline=False, write=False), log=lambda *a: None)
    names = [r["name"] for r in res["rows"]]
    assert names == ["AR baseline", "BARD b4", "SPEC b4"]
    spec = res["rows"][2]
    assert spec["identical_to_ar"] == "3/3" and spec["rounds"] >= 3 and 0 <= spec["mean_accepted"] <= 4
    assert spec["draft_ms_per_round"] > 0 and spec["verify_ms_per_round"] > 0
    assert spec["tokens"] == res["rows"][0]["tokens"]                   # the same answers, the same tokens
    from rich.console import Console

    from bard_deploy.tables import bench_table
    Console(width=250).print(bench_table(res))
    assert "= AR 3/3" in capsys.readouterr().out


def test_a_self_speculative_bench_row_equals_the_checkpoints_own_causal_decode(run, tmp_path, capsys):
    """bench --speculative self on a dual-mode checkpoint: a CAUSAL row (its own causal decode) before its BARD
    rows, a SPEC row whose answers equal the CAUSAL row's request by request, its speed-up over that row; the
    trace's replay takes the CAUSAL configuration as its AR side. A checkpoint without dual mode is refused."""
    src, b4, root = run
    dual = new_checkpoint(tmp_path / "dual", seed=3, bard={"block_size": 4, "source_model": str(src),
                                                           "dual_mode": True}, **SIZES)
    res = bench(BenchOptions((dual,), thresholds=(0.5,), requests=3, warmup=1, max_new_tokens=12,
                             speculative="self", transformers_baseline=False, out=tmp_path / "b"), log=lambda *a: None)
    names = [r["name"] for r in res["rows"]]
    assert names == ["AR baseline", "CAUSAL dual", "BARD dual", "SPEC dual"]
    causal, spec = res["rows"][1], res["rows"][3]
    assert spec["identical_to_causal"] == "3/3" and "identical_to_ar" not in spec
    assert spec["tokens"] == causal["tokens"] and spec["speedup_decode_vs_causal"] > 0
    from rich.console import Console

    from bard_deploy.tables import bench_table
    Console(width=250).print(bench_table(res))
    assert "= causal 3/3" in capsys.readouterr().out
    from bard_deploy.replay import read_trace
    ar, bard, spec_conf = read_trace(tmp_path / "b" / "trace.json", 0.5)
    assert (ar["name"], bard["name"], spec_conf["name"]) == ("CAUSAL dual", "BARD dual", "SPEC dual")
    with pytest.raises(RuntimeInputError, match="needs dual-mode checkpoints"):
        bench(BenchOptions((b4,), requests=1, warmup=0, speculative="self", transformers_baseline=False,
                           write=False), log=lambda *a: None)
    with pytest.raises(RuntimeInputError, match="must be source or self"):
        BenchOptions((b4,), speculative="draft").check()


def test_the_plot_draws_the_lossless_points_as_their_own_curve():
    row = lambda name, th, tps, em: {"name": name, "block_size": 16, "threshold": th,       # noqa: E731
                                     "decode_tokens_per_s": tps, "exact_match": em}
    rows = [{"name": "AR baseline", "block_size": None, "threshold": None, "decode_tokens_per_s": 100,
             "exact_match": 1.0}, row("BARD b16", 0.5, 500, 0.9), row("SPEC b16", 0.5, 250, 1.0),
            row("BARD b16", 0.9, 400, 0.95), row("SPEC b16", 0.9, 200, 1.0)]
    assert plot_curves(rows) == {"BARD B16": [(400, 95.0, 0.9), (500, 90.0, 0.5)],
                                 "SPEC (lossless) B16": [(200, 100.0, 0.9), (250, 100.0, 0.5)]}


def test_the_replay_projects_the_speculative_mode_too(run, tmp_path, capsys):
    """A trace of bench --speculative holds each SPEC request's draft steps and kept tokens per round; the replay
    runs them at a real shape (per round the draft's steps and one verify step of block + 1 tokens) and reports
    the lossless mode's projected speed-up beside BARD's."""
    src, b4, root = run
    bench(BenchOptions((b4,), thresholds=(0.5,), requests=2, warmup=0, max_new_tokens=12, out=tmp_path / "b",
                       transformers_baseline=False, speculative="source"), log=lambda *a: None)
    spec = json.loads((tmp_path / "b" / "trace.json").read_text())["configs"][2]
    assert spec["name"].startswith("SPEC ") and all(len(r["accepted"]) == len(r["steps_per_block"])
                                                     for r in spec["requests"])
    out, r = replay_bench(tmp_path, capsys)
    rounds = sum(len(x["accepted"]) for x in spec["requests"])
    assert r["spec"]["steps"] == sum(sum(x["steps_per_block"]) for x in spec["requests"]) + rounds
    assert r["spec_speedup_decode_vs_ar"] > 0 and r["spec"]["tokens"] == sum(x["tokens"] for x in spec["requests"])
