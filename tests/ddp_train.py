"""Run under torchrun (or alone): a few steps of the tiny trainer with a strategy (ddp | fsdp); rank 0 prints
the loss curve, a fingerprint of the final weights (the run's weight average, which FSDP keeps as shards) and the
loss of a run resumed from the last saved state."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import small_trainer  # noqa: E402

from bard_deploy.data.tokenizer import build_tokenizer  # noqa: E402
from bard_deploy.train.loop import DistInfo  # noqa: E402

torch.set_num_threads(1)
work, steps, strategy = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
d = DistInfo.init()
tok = build_tokenizer()
t = small_trainer(work, tok, steps, dist_info=d, strategy=strategy, ema_decay=0.5)
history = t.run()
model = t.final_model()
weights = [float(v.double().sum()) for v in model.state_dict().values()]
# a new trainer (fresh model and optimizer) resumes from the state saved at step 3
again = small_trainer(work, tok, steps, dist_info=d, strategy=strategy, ema_decay=0.5)
resumed = again.run(resume=True)
again_weights = [float(v.double().sum()) for v in again.final_model().state_dict().values()]
if d.main:
    print("RESULT " + json.dumps({"losses": [h["loss"] for h in history], "weights": weights,
                                  "resumed_losses": [h["loss"] for h in resumed], "resumed_weights": again_weights}),
          flush=True)
d.close()
# About 1 run in 10 under pytest, a rank aborted during interpreter teardown after finishing ("terminate called
# without an active exception", SIGABRT) although the process group was destroyed; the cause is not found yet.
# The results are what this helper checks, so skip the teardown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
