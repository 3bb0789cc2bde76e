"""The training loop shared by every erasure method, in the spirit of nanoGPT's train.py.

One loop, read top to bottom: forward and backward -> NaN guard -> clip and update ->
EMA -> logging -> checkpoint -> termination. A method supplies `loss(step, teacher)`;
`teacher` is the EMA's weights by name (the SDD teacher), which the method's no-grad forwards
pass to `functional_call` (erase.engine.sampling.predict), so only one UNet ever sits in memory
and no forward depends on what autocast cached before it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from erase.engine.distributed import World, average_gradients, values_on_ranks
from erase.engine.params import in_compute_dtype
from erase.errors import EraseError

STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    steps: int = 1500  # optimizer steps (reference 1500)
    lr: float = 1e-5  # AdamW learning rate, constant (reference)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (reference)
    adam_eps: float = 1e-8  # AdamW epsilon (reference)
    weight_decay: float = 1e-4  # AdamW weight decay (reference)
    grad_clip: float = 1.0  # max global grad norm, applied after unscaling (reference); inf: no clipping
    ema_decay: float = 0.999  # EMA <- decay * EMA + (1 - decay) * student after every step (reference); the EMA is written
    seed: int = 42  # seeds every random draw of the run (reference 42)
    log_every: int = 10  # loss-curve sampling interval for the report
    save_every: int = 0  # save a resumable state every N steps (0: only on Ctrl-C)
    # with a retain term: remove from the erasure's gradient its component against the retain term's gradient, when the
    # two conflict (AEGIS's rectified erasure gradient; PCGrad), so that a step that erases does not, to first order,
    # undo what the retain term holds
    project_retain: bool = False


def project_conflict(erase: list[torch.Tensor], retain: list[torch.Tensor]) -> None:
    """erase <- erase - min(0, <erase, retain>) / ||retain||^2 * retain, in place, over all tensors as one vector (PCGrad,
    Yu et al. 2020; AEGIS rectifies the erasure gradient this way). A descent step along the result then does not raise
    the retain loss to first order. Computed on the device, without a host sync."""
    dot = sum((e.float() * r.float()).sum() for e, r in zip(erase, retain))
    norm = sum(r.float().pow(2).sum() for r in retain)
    coef = dot.clamp(max=0) / norm.clamp_min(torch.finfo(torch.float32).tiny)
    for e, r in zip(erase, retain):
        e.sub_((coef * r.float()).to(e.dtype))


class Interrupted(EraseError):
    exit_code = 130


class EMA:
    """Exponential moving average of the trainable parameters, kept in fp32 (the parameters' own master dtype).

    At decay 0 the average is the parameters themselves: no copy is kept (ESD-u on SD 1.5 would hold 3.4 GB for
    nothing), and `shadow` is a detached view of the live parameters."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float) -> None:
        self.decay, self.params = decay, params
        self._copy = {n: p.detach().clone().float() for n, p in params.items()} if decay > 0 else None

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The averaged weights by name: what gets written, and the SDD teacher."""
        return self._copy if self._copy is not None else {n: p.detach() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        if self._copy is not None:  # s = d*s + (1-d)*p, every tensor in one foreach kernel
            torch._foreach_lerp_(list(self._copy.values()), [p.detach() for p in self.params.values()], 1.0 - self.decay)

    @torch.no_grad()
    def load(self, shadow: dict[str, torch.Tensor]) -> None:
        """Restore saved averages (a resumed run); at decay 0 there is nothing of its own to restore."""
        if self._copy is not None:
            for n, s in self._copy.items():
                s.copy_(shadow[n])

    def teacher(self) -> dict[str, torch.Tensor] | None:
        """The weights a teacher forward names; None at decay 0, where the teacher is the UNet's own parameters."""
        return self._copy


@dataclass
class Progress:
    step: int
    loss: float
    ema_loss: float
    elapsed: float


def state_file(path: Path, rank: int = 0) -> Path:
    """Rank 0's state (everything) is state.pt; under a launcher each other rank keeps its own draws and queues beside it."""
    return path / (STATE_FILE if rank == 0 else f"state.rank{rank}.pt")


def save_state(path: Path, state: dict, rank: int = 0) -> None:
    path.mkdir(parents=True, exist_ok=True)
    file = state_file(path, rank)
    tmp = file.with_name(file.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, file)


def load_state(path: Path, rank: int = 0) -> dict:
    file = state_file(path, rank)
    if not file.exists():
        raise EraseError(f"--resume {path}: no {file.name} there (it is written on Ctrl-C or with --save-every"
                         + (", by each rank of the same launch" if rank else "") + ")")
    return torch.load(file, map_location="cpu", weights_only=True)


def each_under_autocast(terms: Iterator[torch.Tensor], device_type: str, dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    """Each loss term's forward in an autocast region of its own (none when `dtype` is None); the caller runs its
    backward outside, as autocast asks. The region's weight cache lives no longer than one term."""
    while True:
        with torch.autocast(device_type, dtype=dtype) if dtype else contextlib.nullcontext():
            loss = next(terms, None)
        if loss is None:
            return
        yield loss


class Trainer:
    def __init__(self, cfg: TrainConfig, method, params: dict[str, torch.nn.Parameter], *, generator: torch.Generator,
                 device: torch.device, autocast_dtype: torch.dtype | None, run_config: dict, state_dir: Path,
                 streams: list[torch.Generator] | None = None, world: World = World(), castable: set[str] = frozenset()) -> None:
        self.cfg, self.method, self.params = cfg, method, params
        self.generator, self.device, self.autocast_dtype = generator, device, autocast_dtype
        self.streams, self.world = streams or [generator], world  # this rank's sample streams (erase.engine.distributed)
        self.run_config, self.state_dir = run_config, state_dir
        self.castable = castable  # the trainable names autocast casts anyway (erase.engine.params.autocast_castable)
        # fused on CUDA: one kernel for every tensor's update instead of several per tensor (the trainable subset is
        # hundreds of tensors); the same AdamW arithmetic
        self.optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                                           fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        self.ema = EMA(params, cfg.ema_decay)
        self.step = 0
        self.curve: list[list[float]] = []  # [step, loss, ema_loss] every log_every steps
        self.ema_loss: float | None = None

    # -- resumable state ------------------------------------------------------------
    def state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state(), "streams": [g.get_state() for g in self.streams]}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "params": {n: p.detach().cpu() for n, p in self.params.items()},
            "ema": {n: s.cpu() for n, s in self.ema.shadow.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "method": self.method.state_dict(),
            "curve": self.curve,
            "ema_loss": self.ema_loss,
            "train_config": asdict(self.cfg),
            "run_config": self.run_config,
        }

    def load(self, state: dict) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.ema.load(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["generator"])
        for g, g_state in zip(self.streams, state["rng"].get("streams", [])):
            g.set_state(g_state)
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.method.load_state_dict(state["method"])
        self.step, self.curve, self.ema_loss = state["step"], state["curve"], state["ema_loss"]

    # -- the loop -------------------------------------------------------------------
    def _terms(self, teacher):
        """The step's loss terms: several where the method has them (`terms`), else its one loss."""
        if hasattr(self.method, "terms"):
            yield from self.method.terms(self.step, teacher)
        else:
            yield self.method.loss(self.step, teacher)[0]

    def _backward(self, terms) -> torch.Tensor:
        """Back-propagate each term in its own autocast region; the sum of their values, on the device (no host sync)."""
        total = torch.zeros((), device=self.device)
        for loss in each_under_autocast(terms, self.device.type, self.autocast_dtype):
            self.scaler.scale(loss).backward()
            total += loss.detach().float()
        return total

    def _backward_projected(self, teacher) -> torch.Tensor:
        """The erasure's terms, then the retain term's, each into gradients of their own; then the erasure's gradient
        without its component against the retain term's (when they conflict), plus the retain term's."""
        total = self._backward(self.method.method_terms(self.step, teacher))
        erase = [p.grad for p in self.params.values()]
        for p in self.params.values():
            p.grad = None
        total += self._backward(self.method.retain_terms(teacher))
        retain = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params.values()]
        erase = [g if g is not None else torch.zeros_like(p) for g, p in zip(erase, self.params.values())]
        project_conflict(erase, retain)
        for p, e, r in zip(self.params.values(), erase, retain):
            p.grad = e.add_(r)
        return total

    def train(self, on_step: Callable[[Progress], None] | None = None) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        mid_step = False
        with deferred_interrupt() as ctrl_c:
            try:
                while self.step < cfg.steps:
                    mid_step = True
                    # forward and backward, term by term where the method has several (the retain term's prompts): each
                    # term's graph is freed by its backward before the next is built
                    # the EMA teacher in autocast's dtype, cast once for the step's every teacher call
                    teacher = in_compute_dtype(self.ema.teacher(), self.castable, self.autocast_dtype)
                    if cfg.project_retain and hasattr(self.method, "retain"):
                        total = self._backward_projected(teacher)
                    else:
                        total = self._backward(self._terms(teacher))  # no host sync per term: the one is below
                    # data parallel: every rank gets the mean gradient over the ranks (a no-op on one process)
                    average_gradients(self.params.values(), self.world)
                    # NaN guard and Ctrl-C, on every rank's at once: a rank alone with a NaN or a stop would leave the others
                    # waiting
                    ranks = values_on_ranks([float(total), float(ctrl_c.pressed)], self.world)
                    losses = [loss for loss, _ in ranks]
                    bad = [r for r, v in enumerate(losses) if not math.isfinite(v)]
                    if bad:
                        where = f" on rank {bad[0]}" if self.world.size > 1 else ""
                        raise EraseError(f"loss became {losses[bad[0]]} at step {self.step}{where}: stopping without writing an "
                                         "output (try a lower --lr, or --precision fp32)")
                    value = sum(losses) / len(losses)
                    # clip (after unscaling) and update
                    self.scaler.unscale_(self.optimizer)
                    if math.isfinite(cfg.grad_clip):
                        torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    # EMA of the trainable subset: this is what gets written
                    self.ema.update()
                    # logging
                    self.ema_loss = value if self.ema_loss is None else 0.95 * self.ema_loss + 0.05 * value
                    self.step += 1
                    mid_step = False  # the step is complete: an interrupt from here on saves it as it is
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps or self.step == 1:
                        self.curve.append([self.step, value, self.ema_loss])
                    if on_step:
                        on_step(Progress(self.step, value, self.ema_loss, time.perf_counter() - t0))
                    # checkpoint
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        save_state(self.state_dir, self.state(), self.world.rank)
                    if any(stop for _, stop in ranks) and self.step < cfg.steps:  # Ctrl-C on some rank during this step
                        raise KeyboardInterrupt
            except KeyboardInterrupt:
                self.optimizer.zero_grad(set_to_none=True)
                if self.state_dir is None:  # a run that cannot resume (textual inversion): nothing is kept
                    raise Interrupted(f"interrupted at step {self.step}/{cfg.steps}; nothing written") from None
                if mid_step:  # a second Ctrl-C, in the middle of a step: its draws are half taken, nothing consistent to save
                    raise Interrupted(f"interrupted twice during step {self.step + 1}/{cfg.steps}; nothing saved "
                                      "(one Ctrl-C finishes the step, then saves a state to resume from)") from None
                save_state(self.state_dir, self.state(), self.world.rank)
                raise Interrupted(f"interrupted at step {self.step}/{cfg.steps}; state saved: resume with --resume {self.state_dir}") from None


class deferred_interrupt:
    """Ctrl-C during a step is held until the step ends (`pressed`), so that the state saved for --resume is a whole
    step's: no per-step snapshot to roll back to is needed. A second Ctrl-C interrupts at once. Only the main thread
    receives signals; elsewhere this does nothing."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        print("\ninterrupt: finishing this step, then saving a state to resume from (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "deferred_interrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
