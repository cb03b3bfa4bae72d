"""A tiny training run for the kill / resume test: `python killable_train.py WORKDIR STEPS OUT.safetensors`."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import small_trainer  # noqa: E402

from bard_deploy.data.tokenizer import build_tokenizer  # noqa: E402

torch.set_num_threads(1)
work, steps, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
t = small_trainer(work, build_tokenizer(), steps)
t.save_every = 1
t.run(resume=True)
save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, out)
print("done", flush=True)
