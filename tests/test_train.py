"""Training: the AR source loop lowers the loss and writes a loadable checkpoint; resume is bit-exact; a tiny
recipe produces loadable b4/b8 checkpoints; distillation with teacher == student gives KL ~ 0; recipes load."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from bard_deploy.checkpoint import load_model
from bard_deploy.config import ModelConfig
from bard_deploy.data.chat import encode_example
from bard_deploy.data.collate import collate_ar, collate_diffusion
from bard_deploy.data.synthetic import make_sample
from bard_deploy.data.tokenizer import build_image_processor, build_tokenizer
from bard_deploy.devices import cpu_name
from bard_deploy.diffusion.mask import NOISY, training_layout, training_mask
from bard_deploy.embedded import embedded_config
from bard_deploy.errors import CheckpointError, ConfigError, RuntimeInputError
from bard_deploy.evaluate import evaluate, synthetic_conversations, synthetic_split
from bard_deploy.prompting import PromptEncoder
from bard_deploy.train.loop import Schedule, Trainer, step_indices
from bard_deploy.train.objective import LossSetup, ar_hidden_before, bard_loss, text_token_ids, with_block_size
from bard_deploy.train.recipe import Recipe, Stage, load_recipe, parse_stages
from bard_deploy.train.run import train
from bard_deploy.train.source import SourceRecipe, build_source, synthetic_examples
from bard_deploy.train.stages import stage_config
from bard_deploy.vlm import BardVLM

TINY = SourceRecipe(train_samples=48, steps=16, batch_size=8, lr=1e-2, warmup=2, hidden=32, layers=2,
                    vision_depth=1, max_len=128)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return build_source(tmp_path_factory.mktemp("runs") / "source", TINY, progress=False, log=lambda *a: None)


def test_source_training_lowers_loss_and_loads(source):
    rows = [json.loads(ln) for ln in (source / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.7
    m = load_model(source)
    assert m.config.bard is None and (source / "loss.png").stat().st_size > 1000
    assert (source / "tokenizer.json").is_file() and (source / "preprocessor_config.json").is_file()
    # cached: a second call with the same recipe reuses it
    msgs = []
    build_source(source, TINY, progress=False, log=msgs.append)
    assert "reusing" in msgs[0]


def test_the_source_vision_width_is_a_recipe_field(tmp_path):
    """SourceRecipe.vision_hidden sets the ViT's width; at its old value (64) the fingerprint of earlier builds
    stays, so their cached sources are still reused."""
    assert SourceRecipe(vision_hidden=64).fingerprint() == SourceRecipe().fingerprint() != \
        SourceRecipe(vision_hidden=128).fingerprint()
    recipe = replace(TINY, vision_hidden=32, steps=1, train_samples=8)
    m = load_model(build_source(tmp_path / "source", recipe, progress=False, log=lambda *a: None))
    assert m.config.vision["hidden_size"] == 32


def test_the_source_kv_heads_and_object_mix_are_recipe_fields(tmp_path):
    """SourceRecipe.kv_heads sets the LM's key / value heads, object_weights and color_share the training
    pictures' mix; at their old values (2, None, 0) the fingerprint of earlier builds stays."""
    base = SourceRecipe().fingerprint()
    assert SourceRecipe(kv_heads=2, object_weights=None, color_share=0.0).fingerprint() == base
    changed = {SourceRecipe(kv_heads=4).fingerprint(), SourceRecipe(object_weights=(1, 1, 2, 2)).fingerprint(),
               SourceRecipe(color_share=0.5).fingerprint()}
    assert len(changed | {base}) == 4
    recipe = replace(TINY, kv_heads=4, object_weights=(0, 0, 0, 1), steps=1, train_samples=8)
    m = load_model(build_source(tmp_path / "source", recipe, progress=False, log=lambda *a: None))
    assert m.config.text.num_key_value_heads == 4


def test_the_source_and_stages_can_build_from_a_weight_average(tmp_path):
    """SourceRecipe.ema_decay / Stage.ema_decay: the build is the run's weight average (Trainer.final_model);
    at 0 the fingerprints of earlier builds stay."""
    assert SourceRecipe(ema_decay=0.0).fingerprint() == SourceRecipe().fingerprint() != \
        SourceRecipe(ema_decay=0.99).fingerprint()
    r = Recipe()
    averaged = replace(r, stages=tuple(replace(s, ema_decay=0.99) for s in r.stages))
    assert replace(r, stages=tuple(replace(s, ema_decay=0.0) for s in r.stages)).fingerprint(r.stages[1]) == \
        r.fingerprint(r.stages[1]) != averaged.fingerprint(averaged.stages[1])
    with pytest.raises(ConfigError, match="ema_decay"):
        Stage("b4", 4, 1, ema_decay=-0.1).check()
    plain, avg = (load_model(build_source(tmp_path / name, replace(TINY, steps=3, train_samples=8, ema_decay=d),
                                          progress=False, log=lambda *a: None)) for name, d in (("a", 0.0), ("b", 0.9)))
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), avg.parameters(), strict=True))


def test_the_source_qk_norm_gain_is_a_recipe_field(tmp_path):
    """SourceRecipe.qk_norm_init sets the LM's query / key norm gains at init (1.0, HF's, keeps earlier
    fingerprints); at a negligible learning rate the built model still holds them."""
    assert SourceRecipe(qk_norm_init=1.0).fingerprint() == SourceRecipe().fingerprint() != \
        SourceRecipe(qk_norm_init=1.5).fingerprint()
    recipe = replace(TINY, qk_norm_init=1.5, steps=1, train_samples=8, lr=1e-12)
    m = load_model(build_source(tmp_path / "source", recipe, progress=False, log=lambda *a: None))
    for layer in m.language_model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            assert torch.allclose(norm.weight, torch.full_like(norm.weight, 1.5), atol=1e-6)


def small_trainer(tmp_path, tok, steps, seed=0, dist_info=None, strategy="ddp", length=None, micro_batch=4,
                  fingerprint="", ema_decay=0.0, on_step=None):
    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1)
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    examples = synthetic_examples(enc, "train", 24, 128)
    cfg = cfg.with_bard(mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)
    torch.manual_seed(seed)
    model = BardVLM(cfg)
    setup = LossSetup("mix", cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal")
    sched = Schedule(steps=steps, lr=2e-3, batch_size=6, micro_batch=micro_batch, warmup=1, ema_decay=ema_decay)
    return Trainer(model, sched, examples,
                   lambda ex: collate_diffusion(ex, cfg, 4, tok.pad_token_id, tok.eos_token_id), bard_loss(setup),
                   tmp_path, seed=seed, save_every=3, progress=False, dist_info=dist_info, strategy=strategy,
                   length=length, fingerprint=fingerprint, on_step=on_step)


def test_length_grouped_micro_batches_change_padding_not_the_math(tmp_path, tok):
    plain = small_trainer(tmp_path / "a", tok, 3, micro_batch=0)          # the whole batch in one forward
    grouped = small_trainer(tmp_path / "b", tok, 3, micro_batch=2, length=lambda ex: ex.num_tokens)
    idx = step_indices(len(grouped.examples), 6, 0, 0)
    lengths = [[grouped.examples[i].num_tokens for i in part] for part, _ in grouped._micro_batches(0)]
    assert [n for part in lengths for n in part] == sorted(grouped.examples[i].num_tokens for i in idx)
    assert len(lengths) == 3
    a, b = plain.run(), grouped.run()
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    for x, y in zip(plain.model.state_dict().values(), grouped.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)  # Adam on float-reordered sums


def test_weight_average_follows_its_warmed_up_decay_and_is_what_the_run_produces(tmp_path, tok):
    seen = []                                                     # the weights after each step, by hand
    t = small_trainer(tmp_path, tok, 4, ema_decay=0.3,
                      on_step=lambda tr: seen.append({k: p.detach().clone() for k, p in tr.model.named_parameters()}))
    t.run()
    last = {k: p.detach().clone() for k, p in t.model.named_parameters()}
    want = dict(seen[0])
    for step, weights in enumerate(seen[1:], start=2):
        decay = min(0.3, (1 + step) / (10 + step))                # 0.25 after step 2, then 0.3
        want = {k: decay * want[k] + (1 - decay) * weights[k] for k in want}
    model = t.final_model()
    for k, p in model.named_parameters():
        torch.testing.assert_close(p, want[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, last[k]) for k, p in model.named_parameters())
    plain = small_trainer(tmp_path / "plain", tok, 4)
    plain.run()
    assert plain.final_model() is plain.model                     # no average: the last weights
    for k, p in plain.model.named_parameters():
        assert torch.equal(p, last[k]), k                         # averaging does not change the training itself
    with pytest.raises(ConfigError, match="ema_decay"):
        Schedule(steps=1, lr=1e-3, batch_size=1, ema_decay=1.0).check()


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_resume_after_interrupt_gives_identical_weights(tmp_path, tok, ema_decay):
    full = small_trainer(tmp_path / "a", tok, 7, ema_decay=ema_decay)
    full.run()
    part = small_trainer(tmp_path / "b", tok, 7, ema_decay=ema_decay)
    step = part.train_step

    def dies_after_4():
        if part.step == 4:
            raise KeyboardInterrupt("killed")                         # after step 4; state was saved at 3
        return step()

    part.train_step = dies_after_4
    with pytest.raises(KeyboardInterrupt):
        part.run()
    resumed = small_trainer(tmp_path / "b", tok, 7, ema_decay=ema_decay)   # a new process: fresh model, optimizer
    assert resumed.load_state() and resumed.step == 3
    resumed.run(resume=True)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    for (k, a), (_, b) in zip(full.final_model().state_dict().items(), resumed.final_model().state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k                                   # and the weight average too
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_resume_refuses_the_state_of_another_recipe(tmp_path, tok):
    small_trainer(tmp_path, tok, 4, fingerprint="recipe-a").run()                # leaves the step-3 state
    with pytest.raises(CheckpointError, match="different recipe"):
        small_trainer(tmp_path, tok, 4, fingerprint="recipe-b").run(resume=True)
    assert small_trainer(tmp_path, tok, 4, fingerprint="recipe-a").load_state()


def test_distillation_with_teacher_equal_student_has_zero_kl(tok):
    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1).with_bard(
        mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)
    torch.manual_seed(0)
    model = BardVLM(cfg).eval()
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    ex = [encode_example(enc, make_sample(i).messages(), 128) for i in range(3)]
    batch = collate_diffusion(ex, cfg, 4, tok.pad_token_id, tok.eos_token_id)
    setup = LossSetup("mask", cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal", teacher=model)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    _, metrics = bard_loss(setup)(model, batch, gens)
    assert abs(metrics["kl"]) < 1e-5


def test_shift_distillation_reads_the_ar_state_that_predicts_each_token(tok):
    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1)
    torch.manual_seed(0)
    ar = BardVLM(cfg).eval()
    bard_cfg = cfg.with_bard(mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)
    student = BardVLM(bard_cfg).eval()
    student.load_state_dict(ar.state_dict())
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    ex = [encode_example(enc, make_sample(i).messages(), 128) for i in (2, 3)]
    batch = collate_diffusion(ex, bard_cfg, 4, tok.pad_token_id, tok.eos_token_id)
    # every real response token of the noisy copy, and by hand the AR run on [prompt | response]: the hidden
    # state at prompt_len - 1 + j predicts response token j
    rows, cols, want = [], [], []
    plain = collate_ar(ex, cfg, tok.pad_token_id)
    with torch.no_grad():
        h = ar(plain.input_ids, plain.position_ids, training_mask(plain.layout, "causal"), plain.pixel_values,
               plain.image_grid_thw)
        for i, e in enumerate(ex):
            P, noisy = len(e.prompt_ids), (batch.layout.kind[i] == NOISY).nonzero().squeeze(1)
            for j in range(len(e.response_ids)):
                rows.append(i), cols.append(int(noisy[j])), want.append(h[i, P - 1 + j])
        got = ar_hidden_before(ar, batch, torch.tensor(rows), torch.tensor(cols))
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-5)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    base = LossSetup("mask", bard_cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal")
    plain_loss, _ = bard_loss(base)(student, batch, [torch.Generator().manual_seed(i) for i in range(2)])
    shifted = LossSetup("mask", bard_cfg.bard.mask_token_id, text_token_ids(tok), 0.05, 20.0, "causal",
                        shift_teacher=ar, shift_weight=0.5)
    loss, metrics = bard_loss(shifted)(student, batch, gens)
    assert 0 < metrics["shift"] <= 2 and (loss > plain_loss).all()
    with pytest.raises(ConfigError, match="shift_distill"):
        Recipe(shift_distill=-1.0).check()


def test_teacher_view_recuts_blocks_of_4():
    lay = training_layout(3, 16, 16)
    t = with_block_size(lay, 4, "block")
    assert t.block[0, 3:19].tolist() == [j // 4 for j in range(16)] == t.block[0, 19:].tolist()
    assert t.block[0, :3].tolist() == [0, 0, 0]


def test_lr_schedule_warmup_cosine_and_stable_then_decay():
    import math
    cos = Schedule(steps=110, lr=1.0, batch_size=1, warmup=10, min_lr_ratio=0.1)
    assert [cos.lr_factor(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    for s in (10, 35, 60, 109):                      # cosine from the peak to min_lr_ratio over the 100 steps
        assert cos.lr_factor(s) == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
    wsd = replace(cos, decay_share=0.25)             # the peak for 75 steps, then the cosine over the last 25
    assert [wsd.lr_factor(s) for s in (4, 10, 50, 85)] == [0.5, 1.0, 1.0, 1.0]
    assert wsd.lr_factor(97.5) == cos.lr_factor(60) and wsd.lr_factor(110) == cos.lr_factor(110) == 0.1
    assert all(wsd.lr_factor(s) >= cos.lr_factor(s) for s in range(110))
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="decay_share"):
            replace(cos, decay_share=bad).check()
    # the source recipe's field: 1.0 (the cosine) keeps earlier builds' fingerprints
    assert SourceRecipe(decay_share=1.0).fingerprint() == SourceRecipe().fingerprint() != \
        SourceRecipe(decay_share=0.25).fingerprint()


def test_tiny_recipe_end_to_end(tmp_path, source, grid_module):
    r = Recipe(name="tiny", out=str(tmp_path), source=str(source), train_samples=24,
               stages=(Stage("b4", 4, 3, batch_size=4), Stage("b8", 8, 2, batch_size=4, distill_steps=2)),
               eval_samples=4)
    threads = torch.get_num_threads()          # training's: the results table's pipelines set their own
    results = train(r, progress=False, log=lambda *a: None)
    for stage, block in (("b4", 4), ("b8", 8)):
        m = load_model(tmp_path / "tiny" / stage)
        b = m.config.bard
        assert (b.block_size, b.stage, b.mask_token_id) == (block, stage, build_tokenizer().convert_tokens_to_ids(
            "<|mask|>"))
        # the source is recorded relative to the checkpoint, so it is found from any working directory
        assert b.data_hash and not Path(b.source_model).is_absolute()
        assert (tmp_path / "tiny" / stage / b.source_model).resolve() == Path(source).resolve()
    assert load_model(tmp_path / "tiny" / "b8").config.bard.parent == "b4"
    assert (tmp_path / "tiny" / "b8" / "metrics-swd.jsonl").is_file()
    assert [row["model"] for row in results["rows"]] == ["source (AR)", "b4", "b8"]
    # exact match split by question type: the counts add up to the rows and to the overall exact match
    tasks = synthetic_split("test", 4)[1]
    for row in results["rows"]:
        split = {t: tuple(map(int, v.split("/"))) for t, v in row["per_group"].items()}
        assert {t: n for t, (_, n) in split.items()} == {t: tasks.count(t) for t in set(tasks)}
        assert sum(h for h, _ in split.values()) == round(row["exact_match"] * 4)
    # results.json says which cell of a grid it is: machine, training threads and processes, seed, source build
    prov = json.loads((tmp_path / "tiny" / "results.json").read_text())["provenance"]
    assert prov == results["provenance"]
    assert (prov["machine"], prov["torch_threads"], prov["processes"], prov["seed"]) == (
        cpu_name(), threads, 1, 0)
    assert prov["default_recipe"] is False and prov["stage_fingerprint"] == r.fingerprint(r.stages[-1])
    assert (prov["source_steps"], prov["source_fingerprint"]) == (TINY.steps, TINY.fingerprint())
    # benchmarks/grid.py --rescore: the same run scored again on more prompts, the same models and settings
    again = grid_module.rescore(tmp_path / "tiny", 6)
    assert again == json.loads((tmp_path / "tiny" / "results-6.json").read_text())
    assert [(r["model"], r["block_size"], r["threshold"], r["n"]) for r in again["rows"]] == [
        (r["model"], r["block_size"], r["threshold"], 6) for r in results["rows"]]
    assert again["provenance"] == prov and again["eval_samples"] == 6
    assert all(sum(int(v.split("/")[1]) for v in r["per_group"].values()) == 6 for r in again["rows"])
    # ... --threshold T: the last stage decoded again on those prompts at T, beside the source's row as scored; at
    # the table's own threshold it reproduces the rescored row (timings aside)
    untimed = lambda row: {k: v for k, v in row.items() if not k.endswith("_s")}      # noqa: E731
    same = grid_module.retune(tmp_path / "tiny", 6, 0.9)
    assert [untimed(r) for r in same["rows"]] == [untimed(again["rows"][0]), untimed(again["rows"][-1])]
    low = grid_module.retune(tmp_path / "tiny", 6, 0.3)
    assert low == json.loads((tmp_path / "tiny" / "results-6-tau0.3.json").read_text())
    assert [(r["model"], r["threshold"], r["n"]) for r in low["rows"]] == [("source (AR)", None, 6), ("b8", 0.3, 6)]
    assert low["provenance"] == prov and low["rows"][1]["tokens_per_forward"] >= again["rows"][-1]["tokens_per_forward"]
    with pytest.raises(ValueError, match="--rescore 5"):
        grid_module.retune(tmp_path / "tiny", 5, 0.5)
    # resuming a finished recipe reuses the stages
    msgs = []
    train(r, progress=False, log=msgs.append)
    assert any("done already" in m for m in msgs)
    # another seed under the same name replaces the stages, and says so
    msgs = []
    train(replace(r, seed=1), progress=False, log=msgs.append)
    assert [m.split(",")[0] for m in msgs if "replacing" in m] == [
        f"{st}: replacing {tmp_path / 'tiny' / st}" for st in ("b4", "b8")]
    assert all("another recipe" in m and "--name" in m for m in msgs if "replacing" in m)


def test_revision_ablation_refuses_revision_on_mask_noise_and_its_canvas_rates_nest(tmp_path, source, ablation_module,
                                                                                    monkeypatch, capsys):
    """benchmarks/revision_ablation.py on a tiny mask-noise B4 and a mix-noise B8 (keep weight 1): one JSON line per
    checkpoint with a decoding row per threshold x --edits setting; revision is a refused row on the mask-noise
    checkpoint and decodes on the mix one (edits per block reported, 0 with revision off); on the planted canvas a
    lower edit threshold fixes and breaks at least as many tokens as a higher one (its confident set contains the
    other's); --per-prompt's fixed and broken answers add up to the change in exact match, and it decodes revision off
    when --edits leaves it out. A malformed --edits is a one-line usage error."""
    r = Recipe(name="abl", out=str(tmp_path), source=str(source), train_samples=24, eval_samples=2,
               stages=(Stage("b4", 4, 3, batch_size=4), Stage("b8", 8, 2, batch_size=4, noise="mix")))
    train(r, progress=False, log=lambda *a: None)
    capsys.readouterr()                                   # train's results table
    run = tmp_path / "abl"
    monkeypatch.setattr(sys, "argv", ["revision_ablation.py", "--model", f"mask={run / 'b4'}", "--model",
                                      f"mix={run / 'b8'}", "--samples", "3", "--thresholds", "0.9,0.3",
                                      "--edits", "off,0.2,0.6", "--per-prompt"])
    ablation_module.main()
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(ln["model"], ln["noise"]) for ln in lines] == [("mask", "mask"), ("mix", "mix")]
    for ln in lines:
        assert [(row["threshold"], row["edit_threshold"]) for row in ln["decode"]] == [
            (t, e) for t in (0.9, 0.3) for e in (None, 0.2, 0.6)]
        for row in ln["decode"]:
            refused = ln["noise"] == "mask" and row["edit_threshold"] is not None
            assert ("refused" in row) == refused
            if not refused:
                assert 0.0 <= row["exact_match"] <= 1.0 and row["tokens_per_forward"] > 0.0
                assert row["edits_per_block"] >= 0.0 and (row["edit_threshold"] is not None or row[
                    "edits_per_block"] == 0.0)
            if not refused and row["edit_threshold"] is not None:   # --per-prompt: on - off = fixed - broken
                off = next(o for o in ln["decode"]
                           if o["threshold"] == row["threshold"] and o["edit_threshold"] is None)
                change = round((row["exact_match"] - off["exact_match"]) * 3)
                assert change == row["fixed_vs_off"] - row["broken_vs_off"]
            else:
                assert "fixed_vs_off" not in row
        canvas = ln["planted_canvas"]
        assert canvas["planted"] > 0 and canvas["right"] > 0
        low, mid, high = (canvas[f"edit {t}"] for t in (0.5, 0.7, 0.9))
        for key in ("fix_rate", "break_rate"):
            assert 1.0 >= low[key] >= mid[key] >= high[key] >= 0.0
    # --per-prompt counts against revision off, so it decodes off when --edits leaves it out
    monkeypatch.setattr(sys, "argv", ["revision_ablation.py", "--model", f"mix={run / 'b8'}", "--samples", "3",
                                      "--thresholds", "0.9", "--edits", "0.6", "--per-prompt"])
    ablation_module.main()
    (only,) = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [(row["edit_threshold"], "fixed_vs_off" in row) for row in only["decode"]] == [(None, False), (0.6, True)]
    monkeypatch.setattr(sys, "argv", ["revision_ablation.py", "--model", f"mix={run / 'b8'}", "--edits", "of,0.5"])
    with pytest.raises(SystemExit):
        ablation_module.main()
    assert "--edits: 'of' is neither 'off' nor a threshold in (0, 1]" in capsys.readouterr().err


def test_grid_run_trains_the_missing_cells_then_tabulates_them(tmp_path, source):
    """benchmarks/grid.py --run: one `bard-deploy train` per missing cell (here a 2-step B4 from the tiny source),
    two at a time, then the table; a cell already there is not trained again."""
    import subprocess
    grid = Path(__file__).resolve().parent.parent / "benchmarks" / "grid.py"
    args = [sys.executable, str(grid), "--out", str(tmp_path), "--seeds", "0,1", "--threads", "1", "--run",
            "--jobs", "2", "--train-args", f"--source {source} --stages b4:4:2 --train-samples 8 --eval-samples 2"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("started") == 2 and "**all three on" in proc.stdout
    for seed in (0, 1):
        prov = json.loads((tmp_path / "t1" / f"s{seed}" / "results.json").read_text())["provenance"]
        assert (prov["seed"], prov["torch_threads"], prov["default_recipe"]) == (seed, 1, False)
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "started" not in again.stdout


def test_provenance_calls_a_run_default_only_with_the_default_stages_and_source_recipe(tmp_path):
    from bard_deploy.train.run import provenance
    assert provenance(Recipe(seed=3), SourceRecipe(seed=3), tmp_path, 2, 1)["default_recipe"] is True
    other = provenance(Recipe(seed=3), SourceRecipe(seed=3, steps=4500), tmp_path, 2, 1)
    assert other["default_recipe"] is False and (other["torch_threads"], other["seed"]) == (2, 3)
    assert (other["source_steps"], other["source_fingerprint"]) == (None, None)     # no build.json there


def test_evaluate_refuses_group_labels_that_do_not_match_the_conversations(source):
    from bard_deploy.runtimes.api import Pipeline
    with pytest.raises(RuntimeInputError, match="3 group labels for 2 conversations"):
        evaluate(Pipeline.load(source), synthetic_conversations("test", 2), ar=True, groups=["a", "b", "c"])


def test_recipe_wires_shift_distillation_into_the_anchor_only(tmp_path, source):
    r = Recipe(name="shift", out=str(tmp_path), source=str(source), train_samples=8, shift_distill=0.5,
               stages=(Stage("b4", 4, 2, batch_size=4), Stage("b8", 8, 2, batch_size=4)), eval_samples=2)
    msgs = []
    train(r, progress=False, log=msgs.append)
    assert any("shift-distillation" in m for m in msgs)
    rows = {st: [json.loads(ln) for ln in (tmp_path / "shift" / st / "metrics-pbm.jsonl").read_text().splitlines()]
            for st in ("b4", "b8")}
    assert all(r["shift"] > 0 for r in rows["b4"]) and not any("shift" in r for r in rows["b8"])


def test_stage_fingerprints_cover_what_determines_the_weights():
    base = Recipe()
    b4, b8 = base.stages[:2]
    ablation = Recipe(name="abl", ar_teacher=True)
    assert ablation.fingerprint(ablation.stages[0]) == base.fingerprint(b4)     # same anchor: reusable
    assert ablation.fingerprint(ablation.stages[1]) != base.fingerprint(b8)     # distilled differently
    assert Recipe(no_distill=True).fingerprint(b8) != base.fingerprint(b8)
    assert Recipe(train_samples=100).fingerprint(b4) != base.fingerprint(b4)
    assert Recipe(stages=(Stage("b4", 4, 10),)).fingerprint(Stage("b4", 4, 10)) != base.fingerprint(b4)
    assert Recipe(eval_samples=5, out="elsewhere").fingerprint(b4) == base.fingerprint(b4)
    # a stage's weight decay: 0 (the old behaviour) keeps earlier fingerprints, another value is another run
    wd = Stage("b4", 4, 10, weight_decay=0.1)
    assert Recipe(stages=(Stage("b4", 4, 10, weight_decay=0.0),)).fingerprint(Stage("b4", 4, 10)) == \
        Recipe(stages=(Stage("b4", 4, 10),)).fingerprint(Stage("b4", 4, 10)) != Recipe(stages=(wd,)).fingerprint(wd)
    with pytest.raises(ConfigError, match="weight_decay"):
        Stage("b4", 4, 10, weight_decay=-0.1).check()


def test_the_expected_range_is_printed_for_the_default_recipe_only():
    """`train` prints the measured range of the default recipe beside its table; a recipe that changes the weights
    (the reference's mix loss, mask noise above the anchor, another source recipe; another seed is still the
    default) gets none."""
    from bard_deploy.train.recipe import DEFAULT_STAGES
    from bard_deploy.train.run import EXPECTED, expected_line, is_default_recipe
    from bard_deploy.train.source import SourceRecipe

    assert is_default_recipe(Recipe()) and is_default_recipe(Recipe(seed=4, name="x", out="y"))
    assert is_default_recipe(Recipe(seed=3), SourceRecipe(seed=3))
    assert not is_default_recipe(Recipe(mix_keep_weight=0.0))
    assert not is_default_recipe(Recipe(stages=tuple(replace(s, noise="mask") for s in DEFAULT_STAGES)))
    assert not is_default_recipe(Recipe(), SourceRecipe(steps=SourceRecipe().steps + 1500))
    line = expected_line()
    for model in ("source (AR)", "b4", "b8", "b16"):
        lo, hi = EXPECTED[model]
        assert 0 < lo <= hi <= 1 and f"{model} {100 * lo:.1f}-{100 * hi:.1f} %" in line


def test_a_stage_weight_decay_reaches_its_optimizer_in_both_passes(tmp_path, source):
    """Stage.weight_decay is the AdamW decay of the stage's matrices in its PBM and SWD passes (norms, biases and
    embeddings stay undecayed, as in the source's training)."""
    from bard_deploy.train.loop import DistInfo
    from bard_deploy.train.stages import StageContext, pass_trainer, stage_passes

    stages = (Stage("b4", 4, 2), Stage("b8", 8, 2, distill_steps=2, weight_decay=0.1))
    recipe = Recipe(stages=stages, out=str(tmp_path), micro_batch=4)
    model = load_model(source)
    tok = build_tokenizer()
    ctx = StageContext(recipe, source, [], tok, "hash", False, DistInfo(), False, lambda *a: None)
    passes = stage_passes(recipe, stages[1], source)
    assert [p.kind for p in passes] == ["pbm", "swd"]
    for p in passes:
        trainer = pass_trainer(ctx, stages[1], model, None, p, torch.device("cpu"))
        assert sorted({g["weight_decay"] for g in trainer.opt.param_groups}) == [0.0, 0.1]


def test_the_shipped_probe_recipes_and_the_fast_preset_differ_from_the_default_in_one_thing_each():
    """benchmarks/recipes/*.toml (README "Parts 5-10") and `--preset fast` (the default until 2026-12-07) change one
    thing of the default recipe: the stage lengths (b4-x2, fast) or the B8 / B16 noise (stages-x2-mask, the noise
    ablation's other arm), with the same stages, warm-ups, learning rates and data, so a comparison with the default
    is one change. stages-x2.toml (every stage of fast twice as long) is the default now; the default's expected
    range is printed for the default only."""
    from bard_deploy.train.recipe import DEFAULT_STAGES, DEFAULT_TRAIN_SAMPLES, PRESETS
    from bard_deploy.train.run import is_default_recipe

    root = Path(__file__).resolve().parent.parent / "benchmarks" / "recipes"
    lengths = {"b4-x2.toml": [(3000, 0), (200, 100), (400, 250)],
               "stages-x2.toml": [(3000, 0), (400, 200), (800, 500)]}
    shape = lambda stages: [replace(s, steps=0, distill_steps=0) for s in stages]     # noqa: E731
    mask = load_recipe(root / "stages-x2-mask.toml")
    assert [s.noise for s in mask.stages] == ["mask", "mask", "mask"] and [s.noise for s in DEFAULT_STAGES][1:] == [
        "mix", "mix"]
    assert mask.stages == tuple(replace(s, noise="mask") for s in DEFAULT_STAGES) and not is_default_recipe(mask)
    assert replace(mask, stages=DEFAULT_STAGES) == Recipe()
    assert sorted(p.name for p in root.glob("*.toml")) == sorted([*lengths, "stages-x2-mask.toml"])
    for name, want in lengths.items():
        r = load_recipe(root / name)
        assert [(s.steps, s.distill_steps) for s in r.stages] == want and shape(r.stages) == shape(DEFAULT_STAGES)
        assert r.train_samples == DEFAULT_TRAIN_SAMPLES and replace(r, stages=DEFAULT_STAGES) == Recipe()
    assert load_recipe(root / "stages-x2.toml").stages == DEFAULT_STAGES and is_default_recipe(Recipe())
    fast, samples = PRESETS["fast"]
    assert [(s.steps, s.distill_steps) for s in fast] == [(1500, 0), (200, 100), (400, 250)]
    assert shape(fast) == shape(DEFAULT_STAGES) and samples == DEFAULT_TRAIN_SAMPLES
    assert not is_default_recipe(Recipe(stages=fast))


def test_recipe_toml_and_stage_specs(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('name = "x"\nt_min = 0.1\n[[stages]]\nname = "b4"\nblock_size = 4\nsteps = 10\n'
                 '[[stages]]\nname = "b8"\nblock_size = 8\nsteps = 5\ndistill_steps = 5\nnoise = "mix"\n'
                 'weight_decay = 0.1\n')
    r = load_recipe(p, seed=3)
    assert r.name == "x" and r.t_min == 0.1 and r.seed == 3 and r.stages[1].noise == "mix"
    assert r.stages[0].weight_decay == 0.0 and r.stages[1].weight_decay == 0.1
    assert parse_stages("b4:4:10,b16:16:5:3")[1] == Stage("b16", 16, 5, distill_steps=3)
    for bad in ("b4:4", "b4:x:1", "b8:8:10"):
        with pytest.raises(ConfigError):
            load_recipe(None, stages=parse_stages(bad))
    p.write_text('nmae = "typo"\n')
    with pytest.raises(ConfigError, match="nmae"):
        load_recipe(p)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_run_follows_the_one_process_loss_curve(tmp_path, strategy):
    """torchrun --nproc_per_node 2 (gloo, CPU) with the same global batch gives the same loss curve and final
    weights, replicated (DDP) or sharded (FSDP2); the sharded run also resumes from its gathered state."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(cmd):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])

    with socket.socket() as sock:                      # a free port: no clash with another rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    one = run([sys.executable, str(here / "ddp_train.py"), str(tmp_path / "one"), "4", strategy])
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = run([torchrun, "--nnodes", "1", "--nproc_per_node", "2", "--master-addr", "127.0.0.1", "--master-port",
               str(port), str(here / "ddp_train.py"), str(tmp_path / "two"), "4", strategy])
    assert len(one["losses"]) == len(two["losses"]) == 4
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4)
    assert one["weights"] == pytest.approx(two["weights"], rel=1e-4, abs=1e-4)   # sums of each tensor
    # resumed from the state saved at step 3 (written from the gathered shards): the same step 4
    assert two["resumed_losses"] == pytest.approx(two["losses"][3:], rel=1e-5)
    assert two["resumed_weights"] == pytest.approx(two["weights"], rel=1e-4, abs=1e-4)  # the average resumed too


def test_recipe_on_a_chat_jsonl(tmp_path, source):
    """The real-user path: --source DIR --data rows.jsonl (images by relative path), bad rows skipped and counted."""
    rows = []
    (tmp_path / "img").mkdir()
    for i in range(12):
        s = make_sample(i)
        s.image().save(tmp_path / "img" / f"{i}.png")
        rows.append(json.dumps({"messages": s.messages(image=f"img/{i}.png")}))
    rows.append('{"messages": [{"role": "user", "content": "no answer"}]}')
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    logs = []
    r = Recipe(name="chat", out=str(tmp_path / "runs"), source=str(source), data=str(tmp_path / "rows.jsonl"),
               stages=(Stage("b4", 4, 2, batch_size=4),), hold_out_every=4, eval_samples=8)
    res = train(r, progress=False, log=logs.append)
    assert any("13 rows read, 1 skipped" in m for m in logs) and any("rows.jsonl:13" in m for m in logs)
    assert any("unknown tokens 0.0 %" in m for m in logs)
    b4 = load_model(tmp_path / "runs" / "chat" / "b4")
    assert b4.config.bard.block_size == 4 and len(b4.config.bard.data_hash) == 16
    # the held-out rows (one in 4 by a hash of the line: never trained on) give the results table
    from bard_deploy.data.chat import held_out_row
    held = sum(held_out_row(line, 4) for line in rows[:12])
    assert 0 < held < 12 and any(f"{12 - held} training examples, {held} held out" in m for m in logs)
    assert res["eval_samples"] == held and [row["model"] for row in res["rows"]] == ["source (AR)", "b4"]
    assert all(row["loss"] > 0 and 0 <= row["exact_match"] <= 1 and row["n"] == held for row in res["rows"])


def test_data_the_tokenizer_does_not_know_is_refused(tmp_path, source):
    """Training on text the tokenizer turns into <unk> is refused above --max-unknown-rate, naming the words; a
    higher limit accepts it and the log reports the rate."""
    row = {"messages": [{"role": "user", "content": "What is this?"},
                        {"role": "assistant", "content": "It is a golden retriever puppy."}]}
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(row) for _ in range(4)) + "\n")
    r = Recipe(name="unk", out=str(tmp_path / "runs"), source=str(source), data=str(tmp_path / "rows.jsonl"),
               stages=(Stage("b4", 4, 1, batch_size=2),), hold_out_every=0)
    with pytest.raises(ConfigError, match=r"does not know \d+\.\d % .*'golden'.*--max-unknown-rate"):
        train(r, progress=False, log=lambda *a: None)
    logs = []
    train(replace(r, max_unknown_rate=1.0), progress=False, log=logs.append)
    assert any("unknown tokens" in m and "'retriever' x4" in m for m in logs)


def test_the_causal_view_loss_is_the_ar_loss_of_the_clean_response(tok):
    """Dual mode's extra term on a packed batch equals the plain AR loss of [prompt | response] (the noisy copy
    hidden, the EOS padding of the last block predicted too): the same model, the same next-token CE."""
    from bard_deploy.train.objective import causal_view_ce
    from bard_deploy.train.source import ar_loss

    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1)
    torch.manual_seed(0)
    model = BardVLM(cfg.with_bard(mask_token_id=tok.convert_tokens_to_ids("<|mask|>"), block_size=4)).eval()
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    ex = [encode_example(enc, make_sample(i).messages(), 128) for i in (2, 3)]
    fit = [e for e in ex if len(e.response_ids) % 4 == 0] or ex[:0]       # no EOS padding: exactly the AR loss
    with torch.no_grad():
        packed = causal_view_ce(model, collate_diffusion(ex, model.config, 4, tok.pad_token_id, tok.eos_token_id))
        plain = ar_loss(model, collate_ar(ex, model.config, tok.pad_token_id), None)[0]
        assert packed.shape == plain.shape and (packed > 0).all()
        for e in fit:
            i = ex.index(e)
            torch.testing.assert_close(packed[i], plain[i], rtol=1e-4, atol=1e-5)
        one = collate_diffusion([ex[0]], model.config, 1, tok.pad_token_id, tok.eos_token_id)   # block 1: no pad
        torch.testing.assert_close(causal_view_ce(model, one)[0],
                                   ar_loss(model, collate_ar([ex[0]], model.config, tok.pad_token_id), None)[0][0],
                                   rtol=1e-4, atol=1e-5)


def test_dual_mode_checkpoints_decode_causally_and_verify_their_own_drafts(tmp_path, source):
    """train --dual-mode: every pass logs the AR term, the checkpoints record dual_mode, their fingerprint differs,
    the results table has a causal row beside each stage, ar=True decodes them, and speculative="self" gives
    exactly their own greedy causal decode; without dual mode both are refused."""
    r = Recipe(name="dual", out=str(tmp_path), source=str(source), train_samples=8, dual_mode=True,
               stages=(Stage("b4", 4, 2, batch_size=4), Stage("b8", 8, 2, batch_size=4, distill_steps=1)),
               eval_samples=2)
    res = train(r, progress=False, log=lambda *a: None)
    assert [row["model"] for row in res["rows"]] == ["source (AR)", "b4", "b4 (causal)", "b8", "b8 (causal)"]
    rows = [json.loads(ln) for ln in (tmp_path / "dual" / "b8" / "metrics-swd.jsonl").read_text().splitlines()]
    assert all(x["ar_ce"] > 0 for x in rows)
    assert Recipe(dual_mode=True).fingerprint(Recipe().stages[0]) != Recipe().fingerprint(Recipe().stages[0])
    from bard_deploy.runtimes.api import Pipeline
    pipe = Pipeline.load(tmp_path / "dual" / "b8")
    assert pipe.config.bard.dual_mode
    rows = [make_sample(i).messages()[:1] for i in (1, 4)]
    want = [pipe.generate_batch([c], ar=True, max_new_tokens=20)[0].token_ids for c in rows]
    got = pipe.generate_batch(rows, speculative="self", max_new_tokens=20)
    assert [g.token_ids for g in got] == want and got[0].call_stats.verify_nfe > 1
    from bard_deploy.embedded import new_checkpoint
    from bard_deploy.errors import RuntimeInputError
    plain = Pipeline.load(new_checkpoint(tmp_path / "plain", bard={"block_size": 4}, hidden=32, layers=1))
    with pytest.raises(RuntimeInputError, match="needs a dual-mode checkpoint"):
        plain.generate("hi", speculative="self", max_new_tokens=4)
    with pytest.raises(RuntimeInputError, match="dual-mode checkpoint, train --dual-mode"):
        plain.generate("hi", ar=True, max_new_tokens=4)


def test_the_embedded_source_follows_the_run_seed(tmp_path):
    """train --seed S builds the embedded source with seed S too (its own directory; seed 0 keeps runs/source),
    so a seed grid covers the source's spread, not only the stages'."""
    stages = (Stage("b4", 4, 1, batch_size=4),)
    for seed in (0, 1):
        r = Recipe(name=f"s{seed}", out=str(tmp_path), train_samples=8, stages=stages, eval_samples=1, seed=seed)
        train(r, progress=False, source_recipe=TINY, log=lambda *a: None)
    a, b = (json.loads((tmp_path / d / "build.json").read_text()) for d in ("source", "source-seed1"))
    assert a["recipe"]["seed"] == 0 and b["recipe"]["seed"] == 1 and a["fingerprint"] != b["fingerprint"]
    w0, w1 = (load_model(tmp_path / d).language_model.embed_tokens.weight for d in ("source", "source-seed1"))
    assert not torch.equal(w0, w1)


def test_train_threads_option(tmp_path, capsys):
    from bard_deploy.cli import main
    assert main(["train", "--preset", "smoke", "--threads", "0", "--out", str(tmp_path)]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_mix_keep_weight_scores_the_unchanged_noisy_tokens(tok):
    """mix noise, mix_keep_weight w: the loss gains w x the mean CE at the noisy positions the noise left as they
    were (the reference scores only changed ones, so a visible token always reads as wrong); mask noise and w = 0
    are the reference loss, and the recipe's fingerprint moves only where the term changes the weights."""
    from bard_deploy.diffusion.loss import weighted_ce
    from bard_deploy.diffusion.noise import corrupt

    cfg = embedded_config(tok, hidden=32, layers=2, vision_depth=1)
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    torch.manual_seed(0)
    model = BardVLM(cfg.with_bard(mask_token_id=mask_id, block_size=4)).eval()
    enc = PromptEncoder(tok, build_image_processor(), cfg.image_token_id, 2)
    batch = collate_diffusion([encode_example(enc, make_sample(i).messages(), 128) for i in (2, 3, 5)],
                              model.config, 4, tok.pad_token_id, tok.eos_token_id)
    text = text_token_ids(tok)

    def loss(noise, w):
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        setup = LossSetup(noise, mask_id, text, 0.05, 20.0, "causal", keep_weight=w)
        with torch.no_grad():
            return bard_loss(setup)(model, batch, gens)

    (base, _), (keep, metrics) = loss("mix", 0.0), loss("mix", 2.0)
    c = corrupt(batch.input_ids, batch.layout, "mix", mask_id, text, 0.05, [torch.Generator().manual_seed(i)
                                                                            for i in range(3)])
    kept = batch.loss_mask & ~c.corrupted
    assert kept.sum() > 0 and c.corrupted.sum() > 0
    with torch.no_grad():
        h = model(c.input_ids, batch.position_ids, training_mask(batch.layout, "causal"), batch.pixel_values,
                  batch.image_grid_thw)
        kept_ce = weighted_ce(model, h, batch.input_ids, kept, torch.ones_like(c.t), batch.loss_mask, 1.0)[0]
    torch.testing.assert_close(keep, base + 2.0 * kept_ce)
    assert metrics["keep_ce"] > 0
    torch.testing.assert_close(loss("mask", 2.0)[0], loss("mask", 0.0)[0])
    stages = (Stage("b4", 4, 1), Stage("b8", 8, 1, noise="mix"))
    r, rk = Recipe(stages=stages, mix_keep_weight=0.0), Recipe(stages=stages, mix_keep_weight=1.0)
    assert r.fingerprint(stages[0]) == rk.fingerprint(stages[0]) and r.fingerprint(stages[1]) != rk.fingerprint(
        stages[1])
    with pytest.raises(ConfigError, match="mix_keep_weight"):
        Recipe(mix_keep_weight=-1.0).check()
    # the checkpoint records it on a mix stage (decoding refuses revision at 0), and through a config round trip
    base = embedded_config(tok, hidden=32, layers=2, vision_depth=1)
    mask_id = tok.convert_tokens_to_ids("<|mask|>")
    for recipe, stage, want in ((r, stages[1], 0.0), (rk, stages[1], 1.0), (rk, stages[0], None)):
        cfg = stage_config(base, recipe, stage, "parent", "source", mask_id, "hash")
        assert cfg.bard.mix_keep_weight == want
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).bard.mix_keep_weight == want
    with pytest.raises(ConfigError, match="mix_keep_weight"):
        base.with_bard(mask_token_id=mask_id, noise="mix", mix_keep_weight=-0.5)
