"""The onnxruntime backend: the exported graphs behind the same `step(feeds) -> outputs` interface.

The export directory is verified (manifest hashes, IO table, model facts) before any graph is loaded. CPU by
default; CUDA and TensorRT execution providers when onnxruntime-gpu is installed and asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from bard_deploy import iospec
from bard_deploy.config import load_config
from bard_deploy.errors import ExportError, RuntimeInputError
from bard_deploy.manifest import read_manifest

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def io_table(io: iospec.DecoderIO) -> dict:
    return {"inputs": [[s.name, s.dtype, list(s.shape)] for s in io.inputs],
            "outputs": [[s.name, s.dtype, list(s.shape)] for s in io.outputs]}


class OrtBackend:
    def __init__(self, directory: str | Path, variant: str | None = None, device: str = "cpu", threads: int = 0):
        import onnxruntime as ort

        directory = Path(directory)
        self.manifest = m = read_manifest(directory)
        self.config = load_config(directory)
        self.io = iospec.DecoderIO.for_config(self.config)
        self.device = torch.device("cpu")          # numpy in and out, whichever provider runs the graph
        if m.get("io") != io_table(self.io):
            raise ExportError("manifest IO table does not match the model config in the export directory", "io")
        b = self.config.bard
        facts = {"num_layers": self.io.num_layers, "num_kv_heads": self.io.num_kv_heads,
                 "mask_token_id": b.mask_token_id if b else None, "block_size": b.block_size if b else None}
        for key, value in facts.items():
            if m.get(key) != value:
                raise ExportError(f"manifest {key}={m.get(key)!r} does not match the config ({value!r})", key)
        graphs = m["graphs"]["decoder"]
        variant = variant or m.get("default_variant", "fp32")
        if variant not in graphs:
            raise ExportError(f"export has no '{variant}' decoder (has: {', '.join(graphs)})", variant)
        if device not in PROVIDERS:
            raise RuntimeInputError(f"device must be one of {tuple(PROVIDERS)}, got {device!r}", device)
        self.variant = variant
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # ORT's worker threads spin after each run by default, starving the torch ops of the decode loop that
        # run between two steps (a 16 x vocab softmax took 4 ms instead of 20 us): let them sleep.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            opts.intra_op_num_threads = threads
        providers = [p for p in PROVIDERS[device] if p in ort.get_available_providers()]
        self.decoder = ort.InferenceSession(str(directory / graphs[variant]), opts, providers=providers)
        names = [i.name for i in self.decoder.get_inputs()]
        if names != [s.name for s in self.io.inputs]:
            raise ExportError(f"decoder graph inputs {names} differ from the IO table", names)
        self.out_names = [o.name for o in self.decoder.get_outputs()]
        self.embeddings = load_file(str(directory / m["embeddings"]))["embed_tokens"]
        self.vision = None
        if m.get("vision"):
            self.vision = ort.InferenceSession(str(directory / m["vision"]["graph"]), opts, providers=providers)
            self.vision_grid = m["vision"]["grid_thw"]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings[input_ids]

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
        if self.vision is None:
            raise RuntimeInputError("this export has no vision graph but an image was given", "image")
        embeds, deepstack, start = [], [], 0
        for grid in grid_thw.tolist():
            if grid != self.vision_grid:
                raise RuntimeInputError(f"vision.onnx was exported for image grid {self.vision_grid} (t, h, w "
                                        f"patches); this image gives {grid}: resize it to the exported size", grid)
            n = grid[0] * grid[1] * grid[2]
            e, d = self.vision.run(None, {"pixel_values": pixel_values[start:start + n].numpy()})
            embeds.append(torch.from_numpy(e))
            deepstack.append(torch.from_numpy(d))
            start += n
        return torch.cat(embeds), torch.cat(deepstack, dim=1)

    def step(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        np_feeds = {k: np.ascontiguousarray(v.detach().numpy()) for k, v in feeds.items()}
        outs = self.decoder.run(self.out_names, np_feeds)
        return {k: torch.from_numpy(v) for k, v in zip(self.out_names, outs, strict=True)}
