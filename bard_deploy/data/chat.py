"""Chat data for real users: JSONL rows of `{"messages": [...]}` in the Qwen-VL chat format.

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "imgs/a.png"},
                                               {"type": "text", "text": "What is shown?"}]},
                  {"role": "assistant", "content": "A red circle."}]}

Images are paths relative to the data root (default: the JSONL file's folder) or `data:` base64 URIs.
A multi-turn row supervises its last assistant turn, which must be the last message. A bad row is reported
with its file and line and then skipped, or is fatal with `on_error="fail"`; never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bard_deploy.errors import DataError
from bard_deploy.prompting import CompressedImages, PromptEncoder, resolve_image_path

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One supervised conversation, tokenized: the prompt (through the assistant header) and the response
    (the last assistant turn, EOS included)."""

    prompt_ids: list[int]
    response_ids: list[int]
    pixels: torch.Tensor | CompressedImages | None = None    # pixel values, or the images to make them from
    image_grid_thw: torch.Tensor | None = None
    source: str = ""
    # the prompt's MRoPE positions per (image token id, merge size), made on first collation: training collates
    # every example on many steps, and rope_index took 0.01-0.02 s of a ~0.2 s source step on 2 cores
    positions: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """(patches, C * tps * ps * ps); made on each access when the images are kept compressed."""
        return self.pixels.pixel_values() if isinstance(self.pixels, CompressedImages) else self.pixels

    @property
    def num_tokens(self) -> int:
        """Prompt + response tokens (image tokens included): the trainer groups micro-batches by it."""
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class Report:
    """The tally of a `read_jsonl` pass: rows read, and each skipped row as "file:line: reason"."""

    rows: int = 0
    skipped: list[str] = field(default_factory=list)   # "file:line: reason"
    tokens: int = 0                                    # text tokens of the kept rows (prompt + response)
    unknown_tokens: int = 0                            # of them, the tokenizer's unknown token
    unknown_words: Counter = field(default_factory=Counter)   # the text pieces that became it
    held_out: list[tuple[Example, list[dict]]] = field(default_factory=list)   # (encoded, messages) per row

    def summary(self) -> str:
        """One line for the log: "N rows read, M skipped"."""
        return f"{self.rows} rows read, {len(self.skipped)} skipped"

    @property
    def unknown_rate(self) -> float:
        """The fraction of the kept rows' text tokens that are the tokenizer's unknown token."""
        return self.unknown_tokens / self.tokens if self.tokens else 0.0

    def unknown_summary(self, top: int = 5) -> str:
        """"unknown tokens 12.3 % (41 of 333; most often 'golden' x3, ...)"."""
        words = ", ".join(f"{w!r} x{n}" for w, n in self.unknown_words.most_common(top))
        return (f"unknown tokens {100 * self.unknown_rate:.1f} % ({self.unknown_tokens} of {self.tokens}"
                + (f"; most often {words})" if words else ")"))


HOLD_OUT_EVERY = 20     # `--data`: one row in 20 (by a hash of its line) is held out for the results table


def held_out_row(line: str, every: int) -> bool:
    """Whether a JSONL line belongs to the held-out split: a hash of its text, so the split is the same on every
    run and machine and an edited row may move, but no row is in both."""
    return every > 0 and int(hashlib.sha256(line.strip().encode()).hexdigest()[:8], 16) % every == 0


def count_unknown(report: Report, encoder: PromptEncoder, example: Example, messages: list[dict]) -> None:
    """Add an example's text tokens and unknown tokens (and the words that became them) to `report`."""
    tok = encoder.tokenizer
    unk = getattr(tok, "unk_token_id", None)
    ids = [t for t in example.prompt_ids + example.response_ids if t != encoder.image_token_id]
    report.tokens += len(ids)
    if unk is None:
        return
    n = sum(t == unk for t in ids)
    report.unknown_tokens += n
    if not n:
        return
    for m in messages:
        content = m["content"]
        texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content
                                                            if isinstance(p, dict) and p.get("type") == "text"]
        for text in texts:
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            report.unknown_words.update(text[a:b] for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"],
                                                                       strict=True) if t == unk)


def check_messages(messages: object) -> list[dict]:
    """Validate the structure of a `messages` list; the DataError says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"'messages' must be a non-empty list, got {type(messages).__name__}", messages)
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"message {i} must be an object, got {type(m).__name__}", m)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"message {i} has role {role!r}, expected one of {ROLES}", role)
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise DataError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}",
                            content)
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise DataError(f"message {i} has a part that is not a text or image part: {part!r}"[:200], part)
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise DataError(f"message {i} has a text part whose 'text' is not a string", part.get("text"))
            if part["type"] == "image" and role == "assistant":
                raise DataError(f"message {i}: images in assistant turns are not supported", "image")
    if messages[-1]["role"] != "assistant":
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("row has no assistant turn to supervise", "messages")
        raise DataError("the last message must be the assistant turn to supervise", messages[-1]["role"])
    return messages


def assistant_text(message: dict) -> str:
    """The text of a message: its string content, or its text parts joined (image parts dropped)."""
    content = message["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def encode_example(encoder: PromptEncoder, messages: list[dict], max_len: int, image_root: str | Path | None = None,
                   source: str = "", compress_images: bool = True) -> Example:
    """Tokenize a checked conversation: prompt = all turns before the last + the assistant header.

    The images are kept compressed (pixel values are made when a batch is collated) unless compress_images
    is False."""
    messages = check_messages(messages)
    prompt = encoder.encode(messages[:-1], add_generation_prompt=True, image_root=image_root,
                            compress_images=compress_images)
    tok = encoder.tokenizer
    answer = assistant_text(messages[-1]).strip()
    if not answer:
        raise DataError("the assistant turn is empty", "assistant")
    response = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    total = len(prompt.input_ids) + len(response)
    if total > max_len:
        raise DataError(f"row is {total} tokens long, more than max_len {max_len}", total)
    pixels = prompt.compressed if prompt.compressed is not None else prompt.pixel_values
    return Example(prompt.input_ids, response, pixels, prompt.image_grid_thw, source)


def jsonl_files(path: str | Path) -> list[Path]:
    """The JSONL files of `path`: the file itself, or every *.jsonl under a directory (recursive, sorted).
    A DataError when the file is missing or the directory holds none."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise DataError(f"no .jsonl files under {path}", str(path))
        return files
    if not path.is_file():
        raise DataError(f"data file {path} not found", str(path))
    return [path]


def read_jsonl(path: str | Path, encoder: PromptEncoder, max_len: int, image_root: str | Path | None = None,
               on_error: str = "skip", report: Report | None = None, hold_out_every: int = 0) -> Iterator[Example]:
    """Examples from a JSONL file or a directory of them. Bad rows: skipped and recorded in `report`
    (`on_error="skip"`), or a DataError naming file and line (`on_error="fail"`). `hold_out_every` > 0: the rows
    `held_out_row` picks go to `report.held_out` (with their messages, image paths resolved) instead of being
    yielded. Text and unknown tokens of the yielded rows are counted in `report`."""
    if on_error not in ("skip", "fail"):
        raise DataError(f"on_error must be 'skip' or 'fail', got {on_error!r}", on_error)
    report = report if report is not None else Report()
    for file in jsonl_files(path):
        root = Path(image_root) if image_root is not None else file.parent
        with open(file, encoding="utf-8", errors="strict") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                report.rows += 1
                where = f"{file}:{lineno}"
                try:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"malformed JSON ({e.msg} at column {e.colno})", line[:80]) from e
                    if not isinstance(row, dict) or "messages" not in row:
                        raise DataError("row must be an object with a 'messages' list", type(row).__name__)
                    example = encode_example(encoder, row["messages"], max_len, root, where)
                    if held_out_row(line, hold_out_every):
                        report.held_out.append((example, resolved_images(row["messages"], root)))
                        continue
                    count_unknown(report, encoder, example, row["messages"])
                    yield example
                except DataError as e:
                    if on_error == "fail":
                        raise DataError(f"{where}: {e}", e.value) from e
                    report.skipped.append(f"{where}: {e}")


def resolved_images(messages: list[dict], root: str | Path) -> list[dict]:
    """A copy of checked messages whose relative image paths are resolved inside `root` (and confined to it)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{**part, "image": str(resolve_image_path(part["image"], root))}
                       if part.get("type") == "image" and isinstance(part.get("image"), str)
                       and not part["image"].startswith("data:") else part for part in content]
        out.append({**m, "content": content})
    return out


def read_conversations(path: str | Path, n: int) -> list[list[dict]]:
    """The first `n` conversations of a JSONL of `{"messages": [...]}` rows, checked, with relative image paths
    resolved inside the file's folder (and confined to it)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                msgs = check_messages(json.loads(line).get("messages"))
            except (json.JSONDecodeError, AttributeError, DataError) as e:
                raise DataError(f"{path}:{lineno}: {e}", lineno) from e
            for m in msgs:
                for part in m["content"] if isinstance(m["content"], list) else []:
                    image = part.get("image") if part["type"] == "image" else None
                    if isinstance(image, str) and not image.startswith("data:"):
                        part["image"] = str(resolve_image_path(image, Path(path).parent))
            rows.append(msgs)
            if len(rows) == n:
                break
    return rows
