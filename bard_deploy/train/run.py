"""`bard-deploy train`: the source model (built or given), every stage of the recipe, then the results table."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from bard_deploy.config import ModelConfig, load_config
from bard_deploy.data.chat import Example, Report, read_jsonl
from bard_deploy.errors import ConfigError
from bard_deploy.evaluate import evaluate, synthetic_conversations
from bard_deploy.prompting import PromptEncoder
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.train.loop import DistInfo
from bard_deploy.train.recipe import Recipe
from bard_deploy.train.source import SourceRecipe, build_source, data_hash, make_encoder, synthetic_examples
from bard_deploy.train.stages import StageContext, train_stage


def _barrier(d: DistInfo) -> None:
    """Wait for every process (a no-op in a single-process run)."""
    if d.world > 1:
        dist.barrier()


def _quiet(*args, **kwargs) -> None:
    """The log of the processes other than the main one: one report per run, not one per process."""


def train(recipe: Recipe, resume: bool = True, progress: bool = True, source_recipe: SourceRecipe = SourceRecipe(),
          log=print) -> dict:
    """Run the whole recipe; returns (and writes `runs/<name>/results.json`) the results table."""
    recipe = recipe.check()
    d = DistInfo.init()
    try:
        return _train(recipe, d, resume, progress, source_recipe, log)
    finally:
        d.close()


def _train(recipe: Recipe, d: DistInfo, resume: bool, progress: bool, source_recipe: SourceRecipe, log) -> dict:
    """`train` inside the process group: source, data, the stages in order (each from the previous), results."""
    log = log if d.main else _quiet
    t0 = time.perf_counter()
    source_dir, source_cfg = resolve_source(recipe, d, resume, progress, source_recipe, log)
    encoder = load_encoder(source_dir, source_cfg)
    examples, dhash = load_examples(recipe, encoder, log)
    ctx = StageContext(recipe, source_dir, examples, encoder.tokenizer, dhash, resume, d, progress, log)
    parent = source_dir
    for stage in recipe.stages:
        parent = train_stage(ctx, stage, parent)
        _barrier(d)                     # the next stage (and the results) read the checkpoint the main one saved
    results = {"train_seconds": round(time.perf_counter() - t0, 1)}
    if d.main:
        results.update(results_table(recipe, source_dir, log))
        (recipe.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def resolve_source(recipe: Recipe, d: DistInfo, resume: bool, progress: bool, source_recipe: SourceRecipe,
                   log: Callable[..., None]) -> tuple[Path, ModelConfig]:
    """The AR source's directory and config: `recipe.source`, or the embedded default built (or reused) under
    `out/source`. A missing checkpoint or one that is already BARD is a ConfigError."""
    if recipe.source is None:
        source_dir = build_source(Path(recipe.out) / "source", source_recipe, resume=resume, progress=progress,
                                  dist_info=d, log=log, device=recipe.device, precision=recipe.precision,
                                  strategy=recipe.strategy)
        _barrier(d)                     # the main process saved it; the others read it next
    else:
        source_dir = Path(recipe.source)
        if not (source_dir / "config.json").is_file():
            raise ConfigError(f"--source {source_dir} is not a checkpoint directory (no config.json)", str(source_dir))
    source_cfg = load_config(source_dir)
    if source_cfg.bard is not None:
        raise ConfigError(f"--source {source_dir} is already a BARD checkpoint (stage {source_cfg.bard.stage}); "
                          "give the AR model", str(source_dir))
    return source_dir, source_cfg


def load_encoder(source_dir: Path, source_cfg: ModelConfig) -> PromptEncoder:
    """The source's tokenizer (which must have the <|mask|> token) and image processor (when it has one)."""
    # lazy: transformers takes seconds to import, and `bard-deploy --help` should not wait for it
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(source_dir, trust_remote_code=False)
    if "<|mask|>" not in tokenizer.get_vocab():
        raise ConfigError(f"the tokenizer of {source_dir} has no <|mask|> token", "<|mask|>")
    processor = (Qwen2VLImageProcessorPil.from_pretrained(source_dir)
                 if (source_dir / "preprocessor_config.json").is_file() else None)
    return make_encoder(tokenizer, processor, source_cfg)


def load_examples(recipe: Recipe, encoder: PromptEncoder, log: Callable[..., None]) -> tuple[list[Example], str]:
    """The encoded training examples and their data hash: the synthetic task, or the chat JSONL of `recipe.data`
    (bad rows skipped or fatal per `on_error`; the first skipped ones are logged)."""
    if recipe.data is None:
        examples = synthetic_examples(encoder, "train", recipe.train_samples, recipe.max_len)
        dhash = data_hash("train", recipe.train_samples)
    else:
        report = Report()
        examples = list(read_jsonl(recipe.data, encoder, recipe.max_len, recipe.image_root, recipe.on_error, report))
        log(f"data: {report.summary()}")
        for line in report.skipped[:10]:
            log(f"  skipped {line}")
        if not examples:
            raise ConfigError(f"no usable rows in {recipe.data}", recipe.data)
        dhash = _file_hash(recipe.data)
    log(f"data: {len(examples)} training examples")
    return examples, dhash


def _file_hash(path: str) -> str:
    """The data hash of a chat JSONL file, or of every *.jsonl under a directory (in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*.jsonl")) if Path(path).is_dir() else [Path(path)]:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def results_table(recipe: Recipe, source_dir: Path, log) -> dict:
    """Test exact match and tokens per forward of the source (AR) and every stage (synthetic task only); prints
    the table and returns its rows."""
    if recipe.data is not None:
        log("results: evaluation runs on the synthetic test split only; skipped for --data")
        return {}
    convs = synthetic_conversations("test", recipe.eval_samples)
    rows = []
    device = recipe.device                               # where training ran: a GPU run evaluates on the GPU
    ev = evaluate(Pipeline.load(source_dir, device=device), convs, ar=True, batch_size=1, max_new_tokens=64)
    rows.append({"model": "source (AR)", "block_size": 1, "threshold": None, **ev.as_dict()})
    for stage in recipe.stages:
        pipe = Pipeline.load(recipe.run_dir / stage.name, device=device)
        ev = evaluate(pipe, convs, batch_size=1, threshold=recipe.eval_threshold, max_new_tokens=64)
        rows.append({"model": stage.name, "block_size": stage.block_size, "threshold": recipe.eval_threshold,
                     **ev.as_dict()})
    Console(width=120).print(results_table_view(rows, len(convs)))
    return {"eval_samples": len(convs), "rows": rows}


def results_table_view(rows: list[dict], samples: int) -> Table:
    """The rich table of `results_table`'s rows (one per model), evaluated on `samples` test samples."""
    table = Table(title=f"results on {samples} test samples (batch 1)")
    for col in ("model", "block", "threshold", "exact match", "token acc", "tokens/forward", "NFE"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], str(r["block_size"]), str(r["threshold"]), f"{100 * r['exact_match']:.1f}%",
                      f"{100 * r['token_accuracy']:.1f}%", f"{r['tokens_per_forward']:.2f}", str(r["nfe"]))
    return table
