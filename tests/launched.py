"""`erase` as a launcher starts it on each rank, with Ctrl-C simulated at step STOP_AT on every rank, a NaN loss at
step NAN_AT on rank NAN_RANK only, or rank DIVERGE_RANK's EMA weights nudged after training (tests only)."""

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

if os.environ.get("NAN_AT"):
    import erase.engine.trainer as trainer_mod

    real_terms, nan_at, nan_rank = trainer_mod.Trainer._terms, int(os.environ["NAN_AT"]), int(os.environ["NAN_RANK"])

    def poisoned(self, teacher):  # the step's first loss term, whatever the method and its wrappers (retain, attack)
        for i, loss in enumerate(real_terms(self, teacher)):
            yield loss * float("nan") if i == 0 and self.step == nan_at and int(os.environ["RANK"]) == nan_rank else loss

    trainer_mod.Trainer._terms = poisoned

if os.environ.get("DIVERGE_RANK"):
    import erase.engine.trainer as trainer_mod

    trained = trainer_mod.Trainer.train

    def diverging(self, on_step=None):
        trained(self, on_step)
        if int(os.environ["RANK"]) == int(os.environ["DIVERGE_RANK"]):
            with torch.no_grad():
                next(iter(self.ema.shadow.values())).add_(1e-3)

    trainer_mod.Trainer.train = diverging

from erase.cli import app  # noqa: E402

sys.exit(app(sys.argv[1:]))
