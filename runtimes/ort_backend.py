"""The onnxruntime backend: the exported graphs behind the same `step(feeds) -> outputs` interface.

The export directory is verified (manifest hashes, IO table, model facts) before any graph is loaded. CPU by
default; CUDA and TensorRT execution providers when onnxruntime-gpu is installed and asked for.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from bard_deploy import iospec
from bard_deploy.config import load_config
from bard_deploy.errors import ExportError, RuntimeInputError
from bard_deploy.manifest import Manifest
from bard_deploy.onnx_files import EmbeddingTable
from bard_deploy.threads import Threads
from bard_deploy.vision import frame_grids, grid_inputs

# what onnxruntime raises (plain Exception subclasses): turned into one-line typed errors here
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.RuntimeException, ort_state.InvalidGraph,
              ort_state.NoSuchFile, ort_state.InvalidProtobuf)
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def session(path: Path, threads: int = 0, device: str = "cpu") -> ort.InferenceSession:
    """An onnxruntime session the way every part of bard-deploy opens one (quiet, non-spinning workers,
    `threads` intra-op threads; 0: the thread policy's default, the cores this process may use)."""
    if device not in PROVIDERS:
        raise RuntimeInputError(f"device must be one of {tuple(PROVIDERS)}, got {device!r}", device)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # ORT's worker threads spin after each run by default, starving the torch ops of the decode loop that
    # run between two steps (a 16 x vocab softmax took 4 ms instead of 20 us): let them sleep.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.intra_op_num_threads = threads or Threads.policy("onnxruntime").backend
    wanted = PROVIDERS[device][0]
    if wanted not in ort.get_available_providers():          # never a quiet CPU run instead
        raise RuntimeInputError(f"device {device!r}: this onnxruntime has no {wanted} (available: "
                                f"{', '.join(ort.get_available_providers())}; install onnxruntime-gpu)", device)
    providers = [p for p in PROVIDERS[device] if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except ORT_ERRORS as e:
        raise ExportError(f"onnxruntime cannot load {path.name}: {_first_line(e)}", str(path)) from e


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def to_numpy(feeds: dict[str, torch.Tensor], dtypes: dict[str, np.dtype] | None = None) -> dict[str, np.ndarray]:
    """Named torch tensors -> contiguous numpy arrays (onnxruntime's feeds); float ones cast to `dtypes[name]`
    where given (the graph's declared type)."""
    out = {}
    for k, v in feeds.items():
        a = v.detach().cpu().numpy()
        if dtypes and k in dtypes and a.dtype != dtypes[k] and a.dtype.kind == "f":
            a = a.astype(dtypes[k])
        out[k] = np.ascontiguousarray(a)
    return out


_FLOAT_INPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ONNX_FLOATS = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def _float_inputs(sess: ort.InferenceSession) -> dict[str, np.dtype]:
    """A session's float inputs and their numpy dtypes (read once per session)."""
    if sess not in _FLOAT_INPUTS:
        _FLOAT_INPUTS[sess] = {i.name: _ONNX_FLOATS[i.type] for i in sess.get_inputs() if i.type in _ONNX_FLOATS}
    return _FLOAT_INPUTS[sess]


def run(sess: ort.InferenceSession, names: list[str], feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One run of `sess`: named torch feeds in (float ones in the graph's float type: an fp16 graph takes the
    processor's fp32 pixels), the named outputs `names` out as torch tensors."""
    try:
        outs = sess.run(names, to_numpy(feeds, _float_inputs(sess)))
    except (*ORT_ERRORS, ValueError) as e:        # ValueError: onnxruntime's own check of the feed names
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        raise RuntimeInputError(f"onnxruntime refused the inputs {shapes}: {_first_line(e)}", shapes) from e
    return {k: torch.from_numpy(v) for k, v in zip(names, outs, strict=True)}


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


_DEVICES: dict[torch.device, object] = {}


def _bind(binding: ort.IOBinding, name: str, t: torch.Tensor, output: bool = False) -> None:
    """Bind a contiguous torch tensor's memory (CPU or CUDA) as an input or output: onnxruntime reads or writes it
    in place, nothing is converted or copied. Through the binding's C object with the OrtDevice made once per
    torch device: the Python wrappers rebuild the device per call (23 binds a step cost 0.24 ms, a fifth of a
    small model's step)."""
    dev = _DEVICES.get(t.device)
    if dev is None:
        dev = _DEVICES[t.device] = ort.OrtDevice.make(t.device.type, t.device.index or 0)._get_c_device()
    c = binding._iobinding
    (c.bind_output if output else c.bind_input)(name, dev, _NUMPY_OF[t.dtype], t.shape, t.data_ptr())


class Binding:
    """The IO binding of one request's steps on one decoder session, kept from step to step: a feed is (re)bound
    only when its memory or shape changed (the KV buffer's layers stay bound until the buffer grows). The new
    K/V (`reuse`) are written into tensors kept per name and reallocated only when their shape changes: valid
    until the same request's next step, and the decode loop commits them before it; every other output (logits,
    the greedy head's ids, which the loop yields) gets a fresh tensor each run. Concurrent requests each have
    their own binding. Pointers of CPU or CUDA tensors alike: the same code binds a device-resident KV buffer on
    the CUDA execution provider."""

    def __init__(self, sess: ort.InferenceSession, reuse: frozenset[str] = frozenset()):
        self.sess, self.reuse = sess, reuse
        self.iob = sess.io_binding()
        self.inputs: dict[str, tuple[int, tuple[int, ...]]] = {}      # name -> (data pointer, shape) bound
        self.outputs: dict[str, torch.Tensor] = {}
        self.names: list[str] | None = None

    def run(self, feeds: dict[str, torch.Tensor], shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
            device: torch.device) -> dict[str, torch.Tensor]:
        """One run on `feeds` (torch tensors; a non-contiguous one is made contiguous first) writing the outputs
        `shapes` (name -> (shape, dtype)); returns them by name."""
        feeds = {k: v.contiguous() for k, v in feeds.items()}         # held until the run returns
        for name, t in feeds.items():
            key = (t.data_ptr(), tuple(t.shape))
            if self.inputs.get(name) != key:
                _bind(self.iob, name, t)
                self.inputs[name] = key
        names = list(shapes)
        if names != self.names:                      # another set of outputs: none of the old stays bound
            self.iob.clear_binding_outputs()
            self.outputs, self.names = {}, names
        for name, (shape, dtype) in shapes.items():
            t = self.outputs.get(name)
            if t is None or tuple(t.shape) != shape or name not in self.reuse:
                t = self.outputs[name] = torch.empty(shape, dtype=dtype, device=device)
                _bind(self.iob, name, t, output=True)
        try:
            if device.type == "cuda":
                self.iob.synchronize_inputs()
            self.sess.run_with_iobinding(self.iob)
            if device.type == "cuda":
                self.iob.synchronize_outputs()
        except ORT_ERRORS as e:
            given = {k: tuple(v.shape) for k, v in feeds.items()}
            raise RuntimeInputError(f"onnxruntime refused the inputs {given}: {_first_line(e)}", given) from e
        return dict(self.outputs)


class OrtBackend:
    """Runs an export directory's decoder (and vision) graphs with onnxruntime.

    `manifest`: a caller that has just written the directory (the exporter's INT8 gate) passes the manifest it
    holds; everyone else leaves it None and the directory is verified against its manifest.json first."""

    # the decode loop hands this backend the whole KV buffer (contiguous: numpy feeds without a copy), grown in
    # chunks of this many columns, instead of the filled part (a strided view numpy would copy every step)
    padded_past = 256
    takes_outputs = True            # step(feeds, outputs): only the outputs asked for come back

    def __init__(self, directory: str | Path, variant: str | None = None, device: str = "cpu", threads: int = 0,
                 manifest: Manifest | None = None):
        directory = Path(directory)
        self.manifest = m = manifest if manifest is not None else Manifest.for_variant(directory, variant)
        self.config = load_config(directory)
        self.io = iospec.DecoderIO.for_config(self.config, m.float_dtype, m.fused_head)
        # where the loop keeps the KV buffer and the step's tensors: on the GPU with the CUDA / TensorRT
        # execution providers (bound in place: nothing crosses PCIe per step but the step's own inputs)
        self.device = torch.device("cuda" if device in ("cuda", "tensorrt") else "cpu")
        m.check_config(self.config)
        self.variant, graph = m.decoder_graph(variant)
        self.decoder = session(directory / graph, threads, device)
        names = [i.name for i in self.decoder.get_inputs()]
        if names != self.io.input_names:
            raise ExportError(f"decoder graph inputs {names} differ from the IO table", names)
        self.embeddings = EmbeddingTable(directory / m.embeddings)
        self.vision = None
        if m.vision is not None:
            self.vision = session(directory / m.vision.graph, threads, device)
            self.vision_io = iospec.VisionIO.for_config(self.config, m.float_dtype)
            names = [i.name for i in self.vision.get_inputs()]
            if names != self.vision_io.input_names:
                raise ExportError(f"{m.vision.graph} takes {names}, not {self.vision_io.input_names}: it was exported "
                                  "for one image size by an older bard-deploy; export the checkpoint again (the "
                                  "vision graph now takes any size)", names)

    @classmethod
    def for_graph(cls, graph: Path, config, embeddings: Path, threads: int = 0, device: str = "cpu",
                  fused_head: bool = True) -> OrtBackend:
        """A backend over one bare fp32 decoder graph and its embedding table, no export directory (nothing to
        verify): bench-step times the decode loop's own step on the graphs it builds."""
        self = cls.__new__(cls)
        self.manifest, self.config, self.variant = None, config, Path(graph).stem
        self.io = iospec.DecoderIO.for_config(config, "float32", fused_head)
        self.device = torch.device("cpu")
        self.decoder = session(Path(graph), threads, device)
        self.embeddings = EmbeddingTable(Path(embeddings))
        self.vision = None
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 -> (B, T, hidden), a lookup in the exported table, on the backend's device."""
        x = self.embeddings(input_ids.cpu())
        return x if self.device.type == "cpu" else x.to(self.device)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        """Run vision.onnx once per image and once per temporal patch of a video (the tower attends within one
        (1, h, w) slice at a time, and its positions repeat per slice: the same result as one run at (t, h, w)),
        at whatever grid the processor gave it."""
        if self.vision is None:
            raise RuntimeInputError("this export has no vision graph but an image was given", "image")
        embeds, deepstack, start = [], [], 0
        inputs: dict[tuple[int, ...], tuple] = {}              # per (1, h, w): computed once per call
        for grid in frame_grids(grid_thw):
            n = grid[1] * grid[2]
            if tuple(grid) not in inputs:
                inputs[tuple(grid)] = grid_inputs(self.config.vision, grid)
            feeds = self.vision_io.feeds(pixel_values[start:start + n], inputs[tuple(grid)])
            e, d = self.vision_io.unpack_outputs(run(self.vision, self.vision_io.output_names, feeds))
            embeds.append(e)
            deepstack.append(d)
            start += n
        return torch.cat(embeds).to(self.device), torch.cat(deepstack, dim=1).to(self.device)

    def binding(self) -> Binding:
        """A request's IO binding (the decode loop makes one per request and passes it to every `step`)."""
        return Binding(self.decoder, frozenset(self.io.new_kv_names))

    def step(self, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None,
             binding: Binding | None = None) -> dict[str, torch.Tensor]:
        """One decoder run; feeds and outputs keyed by the IO table's names (`outputs`: only those; onnxruntime
        then computes and writes nothing else). IO-bound: the feeds (the KV buffer above all) are read where
        they lie and the outputs written in place; with a request's `binding` only what changed since its last
        step is rebound, and the outputs are valid until its next step (without one: a binding for this run
        alone, its outputs never reused)."""
        return (binding or Binding(self.decoder)).run(feeds, self.io.output_shapes(feeds, outputs), self.device)
