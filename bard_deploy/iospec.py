"""The decoder step's IO table: names, dtypes and symbolic shapes, declared once.

Export, validation, calibration and every runtime backend import these names; a tensor name written as a
literal anywhere else is a smell. KV names follow HF (`past_key_values.{i}.key|value`); the step returns only
the new tokens' K/V as `new_key_values.{i}.key|value` (not `present.*`, which elsewhere means past + new):
the runtime owns the cache and commits them.
"""

from __future__ import annotations

from dataclasses import dataclass

INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ATTENTION_BIAS = "attention_bias"
DEEPSTACK_EMBEDS = "deepstack_embeds"
LOGITS = "logits"


def past_key(i: int) -> str:
    return f"past_key_values.{i}.key"


def past_value(i: int) -> str:
    return f"past_key_values.{i}.value"


def new_key(i: int) -> str:
    return f"new_key_values.{i}.key"


def new_value(i: int) -> str:
    return f"new_key_values.{i}.value"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy / ONNX dtype name: "float32", "int64"
    shape: tuple[str | int, ...]     # symbolic dims are strings


@dataclass(frozen=True)
class DecoderIO:
    """The step graph's inputs and outputs for one model shape."""

    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    num_deepstack: int

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        specs = [
            TensorSpec(INPUTS_EMBEDS, "float32", ("batch", "seq", self.hidden_size)),
            TensorSpec(POSITION_IDS, "int64", (3, "batch", "seq")),
            TensorSpec(ATTENTION_BIAS, "float32", ("batch", 1, "seq", "past+seq")),
        ]
        for i in range(self.num_layers):
            for name in (past_key(i), past_value(i)):
                specs.append(TensorSpec(name, "float32", ("batch", self.num_kv_heads, "past", self.head_dim)))
        if self.num_deepstack:
            specs.append(TensorSpec(DEEPSTACK_EMBEDS, "float32",
                                    (self.num_deepstack, "batch", "seq", self.hidden_size)))
        return tuple(specs)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        specs = [TensorSpec(LOGITS, "float32", ("batch", "seq", self.vocab_size))]
        for i in range(self.num_layers):
            for name in (new_key(i), new_value(i)):
                specs.append(TensorSpec(name, "float32", ("batch", self.num_kv_heads, "seq", self.head_dim)))
        return tuple(specs)

    @classmethod
    def for_config(cls, config) -> DecoderIO:
        t = config.text
        return cls(t.num_hidden_layers, t.hidden_size, t.num_key_value_heads, t.head_dim, t.vocab_size,
                   config.num_deepstack)
