"""A tiny training run for the kill / resume tests: `python killable_train.py WORKDIR STEPS OUT.safetensors [K]`.

With K, the process SIGKILLs itself inside its K-th state save, between the two renames of `replace_dir` (the old
state moved aside, the new one not yet in place): the one moment a kill leaves no `state/` directory."""

import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train import small_trainer  # noqa: E402

from bard_deploy.data.tokenizer import build_tokenizer  # noqa: E402

torch.set_num_threads(1)
work, steps, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if len(sys.argv) > 4:
    kill_at, replaces = int(sys.argv[4]), []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "state":
            replaces.append(src)                      # the tmp -> state rename of save len(replaces)
            if len(replaces) == kill_at:               # (from the second save on, state -> old came before it)
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace
t = small_trainer(work, build_tokenizer(), steps)
t.save_every = 1
t.run(resume=True)
save_file({k: v.contiguous() for k, v in t.model.state_dict().items()}, out)
print("done", flush=True)
