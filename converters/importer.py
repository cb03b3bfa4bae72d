"""`bard-deploy import`: an official Bard-VL checkpoint (or one of ours) made a complete checkpoint of ours.

An official `bard_vl` directory records no block size, no mask token and no prompt attention, and some carry
no tokenizer: every command had to be told them again. `import_checkpoint` writes them once into a checkpoint
directory of ours (a qwen3_vl config with its `bard` section), the weights linked (or copied), the tokenizer /
processor files from the source or `--tokenizer`, the EOS ids into generation_config.json. Everything is
checked before any file is written; the directory appears atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bard_deploy.atomic import atomic_dir, recover_dir, write_json
from bard_deploy.checkpoint import INDEX, SIDE_FILES, weight_files
from bard_deploy.config import ModelConfig, load_config, out_of_vocabulary
from bard_deploy.errors import CheckpointError, ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def import_checkpoint(src: str | Path, out: str | Path, block_size: int | None = None,
                      mask_token_id: int | None = None, eos_token_ids: list[int] | None = None,
                      tokenizer: str | Path | None = None, prompt_attention: str | None = None,
                      copy: bool = False, force: bool = False) -> ModelConfig:
    """Write `out`, a checkpoint of ours for the BARD checkpoint `src`; returns its config.

    block_size: the trained block size (required for a bard_vl source; overrides ours); mask_token_id /
    prompt_attention: override the bard section (a bard_vl source defaults to 151671 and "block");
    eos_token_ids: written into generation_config.json; tokenizer: a directory to take the tokenizer /
    processor files from when `src` has none; copy: copy the weights instead of linking them."""
    src, out = Path(src), Path(out)
    config = load_config(src, block_size, mask_token_id, prompt_attention)     # the overrides, validated
    if config.bard is None:
        raise ConfigError(f"{src} is an autoregressive checkpoint (no bard section): `bard-deploy train --source` "
                          "converts it", str(src))
    if config.bard.block_size is None:
        raise ConfigError(f"{src} records no block size (an official Bard-VL checkpoint does not): pass "
                          "--block-size (the size it was trained with)", "block_size")
    vocab = config.text.vocab_size
    bad = out_of_vocabulary(eos_token_ids or [], vocab)
    if bad:
        raise ConfigError(f"--eos-token-id {bad[0]!r} is outside the vocabulary [0, {vocab})", bad[0])
    side = src
    if not _has_tokenizer(src):
        if tokenizer is None:
            raise CheckpointError(f"{src} has no tokenizer files: pass --tokenizer DIR (a directory with the "
                                  "model's tokenizer.json / tokenizer_config.json)", str(src))
        side = Path(tokenizer)
        if not _has_tokenizer(side):
            raise CheckpointError(f"--tokenizer {side} has no tokenizer files", str(side))
    weights = weight_files(src)                           # refuses pickle and missing shards
    _check_tokenizer(side, vocab)
    recover_dir(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{out} exists and is not empty (use --force to replace it)", str(out))
    with atomic_dir(out, CheckpointError, "import") as tmp:
        write_json(tmp / "config.json", config.to_dict())
        for f in weights + ([src / INDEX] if (src / INDEX).is_file() else []):
            if copy:
                shutil.copy2(f, tmp / f.name)
            else:
                os.symlink(f.resolve(), tmp / f.name)
        for name in SIDE_FILES:
            for where in (src, side):
                if (where / name).is_file():
                    shutil.copy2(where / name, tmp / name)
                    break
        if eos_token_ids:
            gen = tmp / "generation_config.json"
            data = json.loads(gen.read_text(encoding="utf-8")) if gen.is_file() else {}
            write_json(gen, {**data, "eos_token_id": list(eos_token_ids)})
    return config


def _check_tokenizer(directory: Path, vocab: int) -> None:
    """The tokenizer of `directory` fits the model's vocabulary (a typed error otherwise)."""
    from transformers import AutoTokenizer  # ~2 s to import: only this command pays it

    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: the tokenizer does not load ({type(e).__name__}: {e})",
                              str(directory)) from e
    if len(tok) > vocab:
        raise CheckpointError(f"the tokenizer in {directory} has {len(tok)} tokens but the model's vocabulary is "
                              f"{vocab}", len(tok))
