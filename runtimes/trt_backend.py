"""Native TensorRT: build an engine from decoder.onnx and run it behind the same `step(feeds)` interface.

Only where TensorRT and a CUDA GPU exist (TensorRT cannot be installed on the dev / CI machine: PyPI's wheels
are download stubs); everything here is import-guarded and its tests are marked `tensorrt`.

- Build: explicit-batch network from the ONNX, strongly typed when the graph carries Q/DQ (the INT8 export for
  `--target tensorrt`), two optimisation profiles (prefill: seq 1..max_prompt, past 0..; denoise: seq fixed at
  the block size (2 x block for commit + denoise), past 0..max_len), a timing cache next to the engine.
- Metadata (`<engine>.json`): TensorRT version, GPU name and compute capability, profiles, the source ONNX's
  sha256. An engine whose metadata does not match this machine or its ONNX is refused (one-line error).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bard_deploy import iospec
from bard_deploy.config import load_config
from bard_deploy.errors import ExportError, RuntimeInputError
from bard_deploy.manifest import Manifest, sha256
from bard_deploy.onnx_files import EmbeddingTable
from bard_deploy.runtimes.ort_backend import OrtBackend


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise RuntimeInputError("the tensorrt backend needs TensorRT (pip install 'bard-deploy[tensorrt]' on a "
                                "machine with an NVIDIA GPU and CUDA)", "tensorrt") from e
    if not torch.cuda.is_available():
        raise RuntimeInputError("the tensorrt backend needs a CUDA GPU; none is visible", "tensorrt")
    return trt


def machine_facts() -> dict:
    """TensorRT version, GPU name and compute capability of this machine (what an engine is built for)."""
    trt = _trt()
    props = torch.cuda.get_device_properties(0)
    return {"tensorrt": trt.__version__, "gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def check_engine_metadata(meta: dict, facts: dict, onnx_sha256: str) -> None:
    """Refuse an engine built for another TensorRT, GPU or ONNX (pure function: testable without TensorRT)."""
    for key in ("tensorrt", "gpu", "compute_capability"):
        if meta.get(key) != facts.get(key):
            raise ExportError(f"TensorRT engine was built for {key} {meta.get(key)!r}, this machine has "
                              f"{facts.get(key)!r}: rebuild it (bard-deploy export --target tensorrt)", key)
    if meta.get("onnx_sha256") != onnx_sha256:
        raise ExportError("TensorRT engine was built from another decoder.onnx: rebuild it", "onnx_sha256")


def profiles(block_size: int, max_prompt: int, max_len: int) -> list[dict]:
    """(min, opt, max) sequence / past / kept-logits lengths of the two optimisation profiles (prefill keeps the
    last position's logits, a BARD step its canvas's: one block)."""
    return [
        {"name": "prefill", "seq": (1, min(256, max_prompt), max_prompt), "past": (0, 0, max_len),
         "keep": (1, 1, max_prompt)},
        {"name": "denoise", "seq": (block_size, block_size, 2 * block_size), "past": (0, max_len // 2, max_len),
         "keep": (1, block_size, 2 * block_size)},
    ]


def build_engine(onnx_path: Path, engine_path: Path, io: iospec.DecoderIO, block_size: int, max_prompt: int = 2048,
                 max_len: int = 4096, strongly_typed: bool = False) -> dict:
    """Build and save an engine + its metadata; returns the metadata."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}", str(onnx_path))
    config = builder.create_builder_config()
    cache_path = engine_path.with_suffix(".timing.cache")
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profs = profiles(block_size, max_prompt, max_len)
    for p in profs:
        prof = builder.create_optimization_profile()
        for spec in io.inputs:
            # (min, opt, max) shapes: the profile's sequence and past lengths, batch 1
            prof.set_shape(spec.name, *(iospec.concrete(spec.shape, {"batch": 1, "seq": p["seq"][i],
                                                                     "past": p["past"][i], "keep": p["keep"][i]})
                                        for i in range(3)))
        config.add_optimization_profile(prof)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name}", str(onnx_path))
    engine_path.write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = {**machine_facts(), "onnx_sha256": sha256(onnx_path), "profiles": profs, "strongly_typed": strongly_typed}
    engine_path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def engine_file(directory: Path, variant: str) -> Path:
    """Where the engine of an export's decoder variant lives. Engines are machine-specific, so they sit beside
    (not inside) the hashed export directory."""
    return directory.parent / f"{directory.name}.{variant}.engine"


def ensure_engine(directory: str | Path, m: Manifest, variant: str | None = None) -> Path:
    """Build the engine of an export's (verified) decoder variant unless it exists; returns its path."""
    directory = Path(directory)
    variant, graph = m.decoder_graph(variant)
    engine = engine_file(directory, variant)
    if not engine.is_file():
        cfg = load_config(directory)
        block = cfg.bard.block_size if cfg.bard else 1
        build_engine(directory / graph, engine, iospec.DecoderIO.for_config(cfg, m.float_dtype, m.fused_head), block,
                     strongly_typed=variant != m.base_variant)
    return engine


class TrtBackend:
    """Runs `<export>.<variant>.engine` on the GPU; `TrtBackend.open` builds it first when absent."""

    @classmethod
    def open(cls, directory: str | Path, variant: str | None = None) -> TrtBackend:
        """The backend of an export directory, building its engine on first use for this GPU."""
        m = Manifest.for_variant(directory, variant)
        ensure_engine(directory, m, variant)
        return cls(directory, variant, manifest=m)

    def __init__(self, directory: str | Path, variant: str | None = None, manifest: Manifest | None = None):
        trt = _trt()
        directory = Path(directory)
        m = manifest if manifest is not None else Manifest.for_variant(directory, variant)
        self.config = load_config(directory)
        m.check_config(self.config)
        self.io = iospec.DecoderIO.for_config(self.config, m.float_dtype, m.fused_head)
        self.device = torch.device("cpu")          # step copies feeds to the GPU and its outputs back
        variant, graph = m.decoder_graph(variant)
        engine = engine_file(directory, variant)
        if not engine.is_file():
            raise ExportError(f"no TensorRT engine {engine} (TrtBackend.open builds it)", str(engine))
        check_engine_metadata(json.loads(engine.with_suffix(".json").read_text()), machine_facts(),
                              sha256(directory / graph))
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine.read_bytes())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.embeddings = EmbeddingTable(directory / m.embeddings)
        self.block_size = self.config.bard.block_size if self.config.bard else 1
        # the vision graph runs once per image: onnxruntime is enough
        self.vision = OrtBackend(directory, variant=m.base_variant, manifest=m) if m.vision is not None else None

    def embed(self, input_ids):
        """(B, T) int64 -> (B, T, hidden), a lookup in the exported table."""
        return self.embeddings(input_ids)

    def encode_images(self, pixel_values, grid_thw):
        """The vision graph through onnxruntime."""
        if self.vision is None:
            raise RuntimeInputError("this export has no vision graph but an image was given", "image")
        return self.vision.encode_images(pixel_values, grid_thw)

    takes_outputs = True

    def step(self, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """One engine run (prefill or denoise profile by the step's length); the outputs (`outputs`: only those)
        copied back to the CPU."""
        seq = feeds[iospec.INPUTS_EMBEDS].shape[1]
        profile = 1 if seq in (self.block_size, 2 * self.block_size) and self.block_size > 1 else 0
        self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
        dev = {k: v.to("cuda", non_blocking=True).contiguous() for k, v in feeds.items()}
        for name, t in dev.items():
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for spec in self.io.outputs:
            shape = tuple(self.context.get_tensor_shape(spec.name))
            dtype = torch.int64 if spec.dtype == "int64" else iospec.FLOAT_DTYPES[spec.dtype]
            outs[spec.name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(spec.name, outs[spec.name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise ExportError("TensorRT execution failed", "execute_async_v3")
        self.stream.synchronize()
        return {k: v.cpu() for k, v in outs.items() if outputs is None or k in outputs}
