"""The Python API products embed: load once, then `generate` / `stream` from any number of threads.

    from bard_deploy.runtimes.api import Pipeline
    pipe = Pipeline.load("runs/default/b16")
    result = pipe.generate("Describe the picture.", images=["cat.png"], threshold=0.9)
    print(result.text, result.stats.tokens_per_forward)
    for piece in pipe.stream("Describe the picture.", images=["cat.png"]):
        print(piece, end="", flush=True)

Thread safety: the loaded weights are read-only (inference mode) and every call allocates its own KV buffer
and statistics, so concurrent calls on one Pipeline are safe and give the same outputs as sequential calls.
The tokenizer (a Rust object that refuses concurrent mutable borrows) is behind a lock; torch's intra-op
threads are shared, so N concurrent calls each run about N times slower on a CPU.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bard_deploy.atomic import recover_dir
from bard_deploy.checkpoint import load_model
from bard_deploy.config import out_of_vocabulary
from bard_deploy.devices import resolve_dtype
from bard_deploy.errors import CheckpointError, RuntimeInputError
from bard_deploy.manifest import Manifest, is_export
from bard_deploy.onnx_files import graph_bytes
from bard_deploy.prompting import EncodedPrompt, PromptEncoder, load_image, video_part, video_tokens
from bard_deploy.runtimes.backend import TorchBackend
from bard_deploy.runtimes.decode import (
    DecodeOptions,
    Generation,
    PromptBatch,
    Stats,
    finish_reason,
    generate,
    row_chunks,
    truncate_at_eos,
)
from bard_deploy.runtimes.ort_backend import OrtBackend
from bard_deploy.runtimes.trt_backend import TrtBackend  # imports TensorRT itself only when used
from bard_deploy.threads import Threads, apply_host_threads
from bard_deploy.video import VideoProcessor
from bard_deploy.vision import visual_mask

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


@dataclass
class Result:
    """One decoded answer: its text, its token ids (up to and including EOS, or up to the token that completed a
    stop string), why it ended, its token counts and its own statistics."""

    text: str
    token_ids: list[int]
    stats: Stats                     # this row's (`Stats.for_row`): its tokens, finish reason and image tokens;
    #                                  the forwards, steps and times of the call it was decoded in
    finish_reason: str = "length"    # "eos", "length" (max_new_tokens) or "stop" (a stop string)
    prompt_tokens: int = 0           # the templated prompt's tokens, image / video tokens included
    image_tokens: int = 0            # the prompt's image and video tokens
    call_stats: Stats | None = None  # the whole call's statistics (every row of its batch)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated for this answer (its EOS included)."""
        return len(self.token_ids)

    def as_dict(self) -> dict:
        """The result as one JSON-able object: text, ids, finish reason, usage and this row's statistics."""
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                          "completion_tokens": self.completion_tokens}, "stats": self.stats.as_dict()}


def backend_kind(backend) -> str:
    """"torch", "onnxruntime" or "tensorrt" for a backend object (wrappers name their inner one's kind)."""
    inner = getattr(backend, "inner", backend)
    if isinstance(inner, TorchBackend):
        return "torch"
    return "tensorrt" if isinstance(inner, TrtBackend) else "onnxruntime"


def eos_ids_of(directory: Path, tokenizer) -> list[int]:
    """EOS ids from generation_config.json (Qwen3-VL lists several) and the tokenizer."""
    ids = set()
    gen = directory / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise CheckpointError(f"{directory}: no EOS token id in generation_config.json or the tokenizer",
                              str(directory))
    return sorted(ids)


def text_after(shown: str, text: str) -> str:
    """What of `text` has not been shown yet (all of it when decoding changed the shown part)."""
    return text[len(shown):] if text.startswith(shown) else text


def ready_text(text: str, shown: str, stop: Sequence[str], final: bool) -> str:
    """What of an answer's text so far may be shown: all of it once the answer is final, else all but the
    characters that could still begin a stop string, and never less than is shown already."""
    if final:
        return text
    return text[:max(len(shown), len(text) - (max(map(len, stop), default=1) - 1))]


class Pipeline:
    """A loaded model with its tokenizer and image processor, ready to decode."""

    def __init__(self, backend, tokenizer, processor, eos_ids: Sequence[int], threads: Threads | None = None,
                 video_processor: VideoProcessor | None = None):
        cfg = backend.config
        self.backend, self.tokenizer, self.eos_ids = backend, tokenizer, list(eos_ids)
        self.threads = threads or Threads.policy(backend_kind(backend))
        self.config = cfg
        self.encoder = PromptEncoder(tokenizer, processor, cfg.image_token_id, cfg.spatial_merge_size,
                                     video_tokens(cfg, video_processor))
        self._lock = threading.Lock()
        self.verifier = None                # the AR source's backend (speculative="source"), when loaded

    @classmethod
    def load(cls, directory: str | Path, backend: str = "auto", variant: str | None = None,
             device: str = "cpu", dtype: str = "fp32", threads: int | None = None, min_pixels: int | None = None,
             max_pixels: int | None = None, mask_token_id: int | None = None, prompt_attention: str | None = None,
             eos_token_ids: Sequence[int] | None = None, verifier: str | Path | None = None) -> Pipeline:
        """Load a checkpoint directory (torch backend) or an export directory (onnxruntime / tensorrt) once.

        backend "auto": torch for a checkpoint, onnxruntime for an export directory (one with manifest.json).
        variant: the export's decoder variant ("fp32", "int8"; default: the manifest's).
        device: torch: cpu, cuda, cuda:N or auto (CUDA when present; the weights, KV buffer and decoding loop
          live there); onnxruntime: cpu or cuda (the execution provider). TensorRT always runs on the GPU.
        dtype: the torch backend's weights: fp32, bf16 or fp16 (loaded lean, straight into that dtype); an export
          runs the graphs it holds (choose those with `variant`).
        threads: the CPU threads of the backend (default: one per 64 MiB of weights, at most the cores this
          process may use); onnxruntime and TensorRT leave torch one thread for the loop's host work
          (bard_deploy/threads.py).
        min_pixels / max_pixels: the image processor's pixel budget for this pipeline (default: the directory's
          preprocessor_config.json); images are resized into it, never refused for their size.
        mask_token_id / prompt_attention: one-off overrides of a checkpoint's bard section (torch backend; an
          export holds them in its graphs); eos_token_ids: the EOS ids to stop at (default: generation_config.json
          and the tokenizer). `bard-deploy import` writes them into a checkpoint once.
        verifier: the AR source (checkpoint or export) that `speculative="source"` verifies drafts with, loaded
          with the same backend, variant, device and threads (default for a checkpoint: the source its bard
          section records; an export needs one given).
        """
        if backend not in BACKENDS:
            raise RuntimeInputError(f"backend must be {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}, got {backend!r}",
                                    backend)
        torch_dtype = resolve_dtype(dtype)
        directory = Path(directory)
        recover_dir(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory} is not a directory", str(directory))
        exported = is_export(directory)
        if exported and dtype != "fp32":
            raise RuntimeInputError(f"dtype {dtype} applies to the torch backend; an export runs the graphs it holds "
                                    "(choose one with variant / --variant)", dtype)
        if backend == "auto":
            backend = "onnxruntime" if exported else "torch"
        if backend == "torch":
            if exported:
                raise RuntimeInputError(f"{directory} is an export directory: use backend onnxruntime or tensorrt",
                                        backend)
            model = load_model(directory, dtype=torch_dtype, mask_token_id=mask_token_id,
                               prompt_attention=prompt_attention)
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            impl = TorchBackend(model, device=device)
            policy = Threads.policy(backend, threads, weights)
        elif not exported:
            raise RuntimeInputError(f"backend {backend} needs an export directory (bard-deploy export); "
                                    f"{directory} has no manifest.json", backend)
        elif mask_token_id is not None or prompt_attention is not None:
            raise RuntimeInputError("an export holds its mask id and prompt attention in its graphs: export a "
                                    "checkpoint that has them (bard-deploy import writes them)", "mask_token_id")
        elif backend == "tensorrt":
            impl = TrtBackend.open(directory, variant=variant)
            policy = Threads.policy(backend, threads)
        else:
            m = Manifest.for_variant(directory, variant)
            policy = Threads.policy(backend, threads, graph_bytes(directory / m.decoder_graph(variant)[1]))
            impl = OrtBackend(directory, variant=variant, device=device, threads=policy.backend, manifest=m)
        pipe = cls.from_backend(impl, directory, policy)
        if eos_token_ids is not None:
            vocab = pipe.config.text.vocab_size
            bad = out_of_vocabulary(eos_token_ids, vocab)
            if bad or not eos_token_ids:
                raise RuntimeInputError(f"eos_token_ids must be token ids in [0, {vocab}), got {list(eos_token_ids)}",
                                        bad[0] if bad else None)
            pipe.eos_ids = sorted(set(eos_token_ids))
        if min_pixels is not None or max_pixels is not None:
            pipe.encoder.set_pixel_budget(min_pixels, max_pixels)
        source = verifier
        if source is None and not exported and pipe.config.bard is not None and pipe.config.bard.source_model:
            source = directory / pipe.config.bard.source_model
            source = source if (source / "config.json").is_file() else None       # moved: give one when asked
        if source is not None:
            pipe.verifier = cls.load(source, backend=backend, variant=variant if exported else None, device=device,
                                     dtype=dtype, threads=threads).backend
            pipe._check_verifier(Path(source), verifier is not None)
        return pipe

    def _check_verifier(self, source: Path, given: bool) -> None:
        """The verifier must be an AR model over this model's vocabulary; a recorded source that is not is
        dropped (asked-for speculative decoding then says so), a given one is an error."""
        v = self.verifier.config
        why = ("it is a BARD checkpoint, not an AR source" if v.bard is not None and not v.bard.dual_mode else
               f"its vocabulary ({v.text.vocab_size}) is not this model's ({self.config.text.vocab_size})"
               if v.text.vocab_size != self.config.text.vocab_size else None)
        if why is None:
            return
        self.verifier = None
        if given:
            raise RuntimeInputError(f"verifier {source}: {why}", str(source))

    @classmethod
    def from_backend(cls, backend, directory: str | Path, threads: Threads | None = None) -> Pipeline:
        """A Pipeline over an existing backend, with the tokenizer / processor files of `directory`; `threads`:
        the thread policy (default: the backend kind's, over the available cores)."""
        # transformers takes ~2 s to import: only commands that decode pay for it (not `bard-deploy --help`)
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        directory = Path(directory)
        tokenizer = None          # without tokenizer files: token ids in and out only (generate_ids)
        if (directory / "tokenizer_config.json").is_file() or (directory / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
            vocab = backend.config.text.vocab_size
            if len(tokenizer) > vocab:
                raise CheckpointError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {vocab}",
                                      len(tokenizer))
        processor = video = None
        if backend.config.has_vision and (directory / "preprocessor_config.json").is_file():
            processor = Qwen2VLImageProcessorPil.from_pretrained(directory)
            video = VideoProcessor.for_directory(directory, processor)
        return cls(backend, tokenizer, processor, eos_ids_of(directory, tokenizer), threads, video)

    def with_backend(self, backend) -> Pipeline:
        """A new Pipeline over `backend` (same model config) sharing this one's tokenizer and processor; this
        one is left as it is (a Pipeline is shared between threads: it is never modified)."""
        assert backend.config == self.config, "with_backend: another model's backend"
        video = self.encoder.video.processor if self.encoder.video is not None else None
        twin = Pipeline(backend, self.tokenizer, self.encoder.processor, self.eos_ids, self.threads, video)
        twin._lock = self._lock                 # the tokenizer is shared, so is the lock that guards it
        return twin

    # ---- requests ------------------------------------------------------------------------------------
    def _messages(self, prompt: str | None, messages: list[dict] | None, images: Sequence[object],
                  videos: Sequence[object] = ()) -> list[dict]:
        if (prompt is None) == (messages is None):
            raise RuntimeInputError("give exactly one of prompt and messages", None)
        if prompt is not None and not isinstance(prompt, str):
            raise RuntimeInputError(f"prompt must be a string, got {type(prompt).__name__} (pass a conversation as "
                                    "messages=...)", type(prompt).__name__)
        if messages is not None:
            if images or videos:
                raise RuntimeInputError("with messages, put the images and videos in the messages' image / video "
                                        "parts", len(images) + len(videos))
            return messages
        content = ([{"type": "image", "image": img} for img in images] + [video_part(v) for v in videos] +
                   [{"type": "text", "text": prompt}])
        return [{"role": "user", "content": content}]

    def _text(self) -> None:
        """A RuntimeInputError unless this pipeline has a tokenizer (text in or out needs one)."""
        if self.tokenizer is None:
            raise RuntimeInputError("this model directory has no tokenizer files: decode token ids with "
                                    "generate_ids (generate --prompt-ids on the command line)", "tokenizer")

    def encode(self, messages: list[dict]) -> EncodedPrompt:
        """A conversation encoded as a request would be (chat template, images, videos): what a server checks
        a request with before queueing it (thread-safe; a DataError names a bad part)."""
        self._text()
        with self._lock:
            return self.encoder.encode(messages)

    def _batch(self, conversations: list[list[dict]]) -> PromptBatch:
        self._text()
        with self._lock:
            encoded = [self.encoder.encode(m) for m in conversations]
        return self._rows(encoded)

    def _id_batch(self, prompts: Sequence[Sequence[int]], images: Sequence[object]) -> PromptBatch:
        """Token-id prompts as a batch: each row's image pads (one per image, or already expanded) take the
        images in order, row after row."""
        if not prompts or any(isinstance(p, (int, str)) or len(p) == 0 for p in prompts):
            raise RuntimeInputError("prompt ids must be non-empty lists of token ids", None)
        vocab = self.config.text.vocab_size
        bad = out_of_vocabulary([t for p in prompts for t in p], vocab)
        if bad:
            raise RuntimeInputError(f"token id {bad[0]!r} is not in the model's vocabulary (0 .. {vocab - 1})", bad[0])
        loaded = [load_image(i) for i in images]
        encoded, used = [], 0
        img = self.config.image_token_id
        for p in prompts:
            ids = list(p)
            # one image per run of image pads (a single pad, or a run already expanded to its token count)
            take = sum(1 for i, t in enumerate(ids) if t == img and (i == 0 or ids[i - 1] != img))
            encoded.append(self.encoder.with_images(ids, loaded[used:used + take]))
            used += take
        if used != len(loaded):
            raise RuntimeInputError(f"{len(loaded)} images given but the prompt ids hold image pads for {used}",
                                    len(loaded))
        return self._rows(encoded)

    def _rows(self, encoded: list) -> PromptBatch:
        pv = [e.pixel_values for e in encoded if e.pixel_values is not None]
        grids = [e.image_grid_thw for e in encoded if e.image_grid_thw is not None]
        pad = (self.tokenizer.pad_token_id if self.tokenizer is not None else None) or 0
        return PromptBatch.from_rows([e.input_ids for e in encoded], torch.cat(pv) if pv else None,
                                     torch.cat(grids) if grids else None, pad_id=pad)

    def _ar(self, ar: bool) -> bool:
        if ar and self.config.bard is not None and not self.config.bard.dual_mode:
            raise RuntimeInputError("this is a BARD checkpoint; the AR mode (ar=True, --ar) decodes an AR source "
                                    "model (or a dual-mode checkpoint, train --dual-mode)", "ar")
        if not ar and self.config.bard is None:
            raise RuntimeInputError("this checkpoint is an AR model (no 'bard' section): decode it in AR mode "
                                    "(ar=True; --ar on the command line)", "ar")
        return ar

    def decode_text(self, ids: list[int]) -> str:
        """Token ids -> text, special tokens skipped (thread-safe)."""
        self._text()
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                 images: Sequence[object] = (), videos: Sequence[object] = (), ar: bool = False,
                 **options) -> Result:
        """Decode one request; `options` are DecodeOptions fields (block_size, threshold, max_new_tokens...).
        `videos`: each a list of frames (paths, data URIs, PIL images) or a video part dict (frames + fps)."""
        return self.generate_batch([self._messages(prompt, messages, images, videos)], ar=ar, **options)[0]

    def generate_batch(self, conversations: list[list[dict]], *, ar: bool = False, **options) -> list[Result]:
        """Decode several conversations as one left-padded batch (each row gives what it gives alone)."""
        opts = DecodeOptions.of(options)
        apply_host_threads(self.threads)
        batch = self._batch(conversations)
        return self._results(generate(self.backend, batch, opts, self.eos_ids, self._ar(ar), self.verifier),
                             batch, opts)

    def _results(self, g: Generation, batch: PromptBatch, opts: DecodeOptions) -> list[Result]:
        """One Result per row: stop strings applied, its own statistics and counts."""
        cfg = self.config
        real = batch.attention_mask.bool()
        visual = (visual_mask(batch.input_ids, cfg.image_token_id, cfg.video_token_id) & real).sum(1).tolist()
        out = []
        for i, ids in enumerate(g.token_ids):
            text, ids, stopped = self.answer_text(ids, opts.stop)
            if stopped:
                g.stats.tokens[i], g.stats.finish_reasons[i] = len(ids), "stop"
            out.append((text, ids, i))
        return [Result(text, ids, g.stats.for_row(i, visual[i]), g.stats.finish_reasons[i], int(real[i].sum()),
                       visual[i], g.stats) for text, ids, i in out]

    def answer_text(self, ids: list[int], stop: Sequence[str] = ()) -> tuple[str, list[int], bool]:
        """(text, ids, stopped) of an answer's ids: their text, or, when it holds a stop string, the text before
        the first one and the ids up to the token that completed it (stopped True)."""
        text = self.decode_text(ids)
        if not any(x in text for x in stop):
            return text, ids, False
        for k in range(1, len(ids) + 1):
            part = self.decode_text(ids[:k])
            hits = [part.index(x) for x in stop if x in part]
            if hits:
                return part[:min(hits)], ids[:k], True
        return text, ids, False              # only the whole decodes to the stop string: no token completes it

    def generate_ids(self, prompt_ids: Sequence[int] | Sequence[Sequence[int]], *, images: Sequence[object] = (),
                     ar: bool = False, **options) -> Generation:
        """Decode token ids (one prompt, or a batch of them) without a tokenizer or chat template: the answers'
        token ids per row (up to and including EOS) and the call's statistics. Image pads in the ids take
        `images` in order: one pad per image (expanded here by the processor's grid) or already expanded."""
        rows = [prompt_ids] if prompt_ids and isinstance(prompt_ids[0], int) else list(prompt_ids)
        opts = DecodeOptions.of(options)
        if opts.stop:
            raise RuntimeInputError("stop strings end text: decode with generate / generate_batch (token ids in "
                                    "and out have no text to search)", opts.stop)
        apply_host_threads(self.threads)
        return generate(self.backend, self._id_batch(rows, images), opts, self.eos_ids, self._ar(ar), self.verifier)

    def stream_ids(self, prompt_ids: Sequence[int], *, images: Sequence[object] = (), ar: bool = False,
                   stats: Stats | None = None, **options) -> Iterator[list[int]]:
        """Yield the answer's token ids as they are decoded (a block, or an AR token, at a time; cut after EOS)."""
        opts = DecodeOptions.of(options)
        batch = self._id_batch([prompt_ids], images)
        stats = stats if stats is not None else Stats()
        apply_host_threads(self.threads)
        raw: list[int] = []
        shown = 0
        for chunk in row_chunks(self.backend, batch, opts, self.eos_ids, stats, self._ar(ar), self.verifier):
            raw += chunk[0]
            kept = truncate_at_eos([raw], set(self.eos_ids), opts.max_new_tokens)[0]
            if len(kept) > shown:
                yield kept[shown:]
                shown = len(kept)
        stats.tokens = [shown]

    def stream_batch(self, conversations: list[list[dict]], *, ar: bool = False, stats: Stats | None = None,
                     **options) -> Iterator[list[list[int]]]:
        """Decode several conversations as one batch, yielding after every decoded chunk (a block, or an AR
        token) each row's answer token ids so far (cut after its EOS and at max_new_tokens): what a server streams
        to several clients at once. Stop strings are the caller's (per row, on the text)."""
        opts = DecodeOptions.of(options)
        if opts.stop:
            raise RuntimeInputError("stream_batch yields token ids: apply stop strings to each row's text", opts.stop)
        batch = self._batch(conversations)
        stats = stats if stats is not None else Stats()
        apply_host_threads(self.threads)
        rows: list[list[int]] = [[] for _ in conversations]
        eos = set(self.eos_ids)
        for chunk in row_chunks(self.backend, batch, opts, self.eos_ids, stats, self._ar(ar), self.verifier):
            for r, part in zip(rows, chunk, strict=True):
                r += part
            kept = truncate_at_eos(rows, eos, opts.max_new_tokens)
            stats.tokens = [len(k) for k in kept]
            stats.finish_reasons = [finish_reason(k, self.eos_ids) for k in kept]
            yield kept

    def stream(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               images: Sequence[object] = (), videos: Sequence[object] = (), ar: bool = False,
               stats: Stats | None = None, **options) -> Iterator[str]:
        """Yield the answer's text as it is decoded: one piece per block (BARD) or per token (AR). With stop
        strings, text that could begin one is held back until it cannot, and decoding ends at the first one
        (stats.finish_reasons ["stop"])."""
        opts = DecodeOptions.of(options)
        batch = self._batch([self._messages(prompt, messages, images, videos)])
        stats = stats if stats is not None else Stats()
        apply_host_threads(self.threads)
        tokens: list[int] = []
        kept: list[int] = []
        text = shown = ""
        stopped = False
        for chunk in row_chunks(self.backend, batch, opts, self.eos_ids, stats, self._ar(ar), self.verifier):
            tokens += chunk[0]
            text, kept, stopped = self.answer_text(truncate_at_eos([tokens], set(self.eos_ids),
                                                                   opts.max_new_tokens)[0], opts.stop)
            ready = ready_text(text, shown, opts.stop, stopped)
            if ready != shown:
                yield text_after(shown, ready)
                shown = ready
            if stopped:
                break
        if not stopped and text_after(shown, text):
            yield text_after(shown, text)
        stats.tokens = [len(kept)]
        stats.finish_reasons = ["stop" if stopped else finish_reason(kept, self.eos_ids)]
