"""Task accuracy of any checkpoint under any decode settings: exact match and token accuracy on a split of the
synthetic task (or any list of conversations), decoded through the runtime in batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bard_deploy.data.chat import assistant_text
from bard_deploy.data.synthetic import samples
from bard_deploy.errors import RuntimeInputError


@dataclass
class EvalResult:
    """Accuracy and cost of decoding a set of conversations."""

    n: int
    exact_match: float                 # fraction of answers whose text equals the reference
    token_accuracy: float              # fraction of reference tokens (EOS included) reproduced in place
    tokens_per_forward: float          # mean over batches (batch rows decode together)
    nfe: int
    tokens: int
    decode_s: float
    prefill_s: float
    failures: list[dict] = field(default_factory=list)   # the first few mismatches, for a human to look at
    edits: int = 0                     # token revisions made (edit_threshold), all rows
    row_blocks: int = 0                # blocks decoded, counted once per row of each batch (edits / this: per block)
    per_group: dict[str, list[int]] = field(default_factory=dict)   # group label -> [exact matches, rows]

    def as_dict(self) -> dict:
        """The JSON row (rounded; failures left out)."""
        return {"n": self.n, "exact_match": round(self.exact_match, 4), "token_accuracy": round(self.token_accuracy, 4),
                "tokens_per_forward": round(self.tokens_per_forward, 3), "nfe": self.nfe, "tokens": self.tokens,
                "decode_s": round(self.decode_s, 3), "prefill_s": round(self.prefill_s, 3), "edits": self.edits,
                "edits_per_block": round(self.edits / self.row_blocks, 4) if self.row_blocks else 0.0,
                **({"per_group": {g: f"{h}/{t}" for g, (h, t) in self.per_group.items()}} if self.per_group else {})}


def evaluate(pipe, conversations: Sequence[list[dict]], ar: bool = False, batch_size: int = 16,
             keep_failures: int = 5, groups: Sequence[str] | None = None, **options) -> EvalResult:
    """Decode the prompt of each conversation (all turns but the last) and compare with its last turn.
    `groups`, one label per conversation (the synthetic task's question types), splits exact match by label."""
    if groups is not None and len(groups) != len(conversations):
        raise RuntimeInputError(f"{len(groups)} group labels for {len(conversations)} conversations", len(groups))
    per_group: dict[str, list[int]] = {}
    hits = correct = total = nfe = tokens = edits = row_blocks = 0
    tpf_sum, batches, decode_s, prefill_s = 0.0, 0, 0.0, 0.0
    failures: list[dict] = []
    for start in range(0, len(conversations), batch_size):
        chunk = conversations[start:start + batch_size]
        results = pipe.generate_batch([c[:-1] for c in chunk], ar=ar, **options)
        stats = results[0].call_stats
        nfe += stats.nfe
        tokens += stats.total_tokens
        tpf_sum += stats.tokens_per_forward
        decode_s += stats.decode_s
        prefill_s += stats.prefill_s
        edits += stats.edits
        row_blocks += len(stats.steps_per_block) * len(chunk)
        batches += 1
        for i, (conv, res) in enumerate(zip(chunk, results, strict=True)):
            ref_text = assistant_text(conv[-1]).strip()
            ref_ids = pipe.tokenizer(ref_text, add_special_tokens=False)["input_ids"] + [pipe.tokenizer.eos_token_id]
            hits += res.text == ref_text
            if groups is not None:
                tally = per_group.setdefault(groups[start + i], [0, 0])
                tally[0] += res.text == ref_text
                tally[1] += 1
            correct += sum(a == b for a, b in zip(res.token_ids, ref_ids, strict=False))
            total += len(ref_ids)
            if res.text != ref_text and len(failures) < keep_failures:
                failures.append({"expected": ref_text, "got": res.text})
    n = len(conversations)
    return EvalResult(n, hits / max(n, 1), correct / max(total, 1), tpf_sum / max(batches, 1), nfe, tokens,
                      decode_s, prefill_s, failures, edits, row_blocks, dict(sorted(per_group.items())))


def synthetic_conversations(split: str, n: int) -> list[list[dict]]:
    """The first n conversations (question and reference answer) of a split of the synthetic task."""
    return synthetic_split(split, n)[0]


def synthetic_split(split: str, n: int) -> tuple[list[list[dict]], list[str]]:
    """The first n conversations of a split of the synthetic task and the question type (read / where / describe
    / count) of each, from one scan of the split: the types are the `groups` of `evaluate` that split exact match
    by task."""
    chosen = list(samples(split, n))
    return [s.messages() for s in chosen], [s.task for s in chosen]
