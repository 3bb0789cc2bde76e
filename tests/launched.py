"""`erase` as a launcher starts it on each rank, with Ctrl-C simulated at step STOP_AT on every rank (tests only)."""

import os
import sys

import torch

torch.set_num_threads(1)

if os.environ.get("STOP_AT"):
    import erase.engine.trainer as trainer_mod

    real_train, stop = trainer_mod.Trainer.train, int(os.environ["STOP_AT"])

    def interrupted(self, on_step=None):
        def hook(p):
            if on_step:
                on_step(p)
            if p.step == stop:
                raise KeyboardInterrupt
        return real_train(self, hook)

    trainer_mod.Trainer.train = interrupted

from erase.cli import app  # noqa: E402

sys.exit(app(sys.argv[1:]))
