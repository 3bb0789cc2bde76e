"""No-grad DDIM trajectories with classifier-free guidance (the SDD teacher's sampler).

Notation (DDIM, Song et al. 2021; CFG, Ho & Salimans 2022):
  z_T      `z` at the first timestep, pure noise N(0, I)
  t_i      `timesteps[i]`, i = 0 .. K-1, descending (981, 961, ... for K = 50)
  eps~     `guided` = eps(z, "") + w * (eps(z, c) - eps(z, ""))   (or v, for v-prediction models)
  z_{i+1}  `scheduler.step(guided, t_i, z).prev_sample` with eta = 0 (deterministic)
After i steps the latent sits at timestep t_i, which is where SDD trains on it.
The loop is the scheduler's: with a FlowMatchEulerDiscreteScheduler (SD3 / FLUX.1) each step is a flow-matching Euler
step on the guided velocity (tests/test_transformer_load.py).

Whose weights: every function takes `weights`, a dict of tensors by diffusers parameter name (the EMA teacher, the
frozen input copy) that the forward uses instead of the UNet's own (`torch.func.functional_call`); None = the UNet's
own parameters. Naming the weights, rather than swapping `p.data` in and out, is what keeps mixed precision right:
autocast caches its low-precision copy of each fp32 parameter that requires grad, keyed by the tensor object, for
the whole autocast region (even under no_grad), so a forward after a `.data` swap silently reused the previous
weights. Tensors passed by name do not require grad and are never cached: each forward casts the weights it names.
"""

from __future__ import annotations

import torch

from erase.backbones import guidance_distilled, transformer_forward
from erase.models import Conditioning, unet_kwargs


class EvalCounter:
    """Counts UNet forward-equivalents: one per sample per forward, two per sample per backward; and `calls`, the UNet
    forward calls themselves (a batch of any size is one call: on a GPU, what a step waits for)."""

    def __init__(self) -> None:
        self.total = 0
        self.calls = 0

    def reset(self) -> None:
        self.total = self.calls = 0

    def forward(self, batch: int) -> None:
        self.total += batch
        self.calls += 1

    def backward(self, batch: int) -> None:
        self.total += 2 * batch


Weights = dict[str, torch.Tensor] | None  # parameters by diffusers name, used in place of the UNet's own; None: its own


def predict(unet, z: torch.Tensor, t, cond: Conditioning, resolution: int, counter: EvalCounter | None = None,
            weights: Weights = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's raw output (eps or v) for latents `z` (B, C, h, w) at timestep `t`, with `weights` in place of the
    UNet's own parameters of those names (the rest are the UNet's)."""
    if counter is not None:
        counter.forward(z.shape[0])
    family_forward = transformer_forward(unet)
    if family_forward is not None:  # SD3 / FLUX.1: the family's inputs (erase.backbones)
        def call(**inputs):
            if weights is None:
                return unet(**inputs)
            return torch.func.functional_call(unet, weights, (), inputs, tie_weights=False)

        return family_forward(call, z, t, cond, unet.config, guidance=guidance)
    if weights is None:
        return unet(z, t, **unet_kwargs(cond, resolution)).sample
    return torch.func.functional_call(unet, weights, (z, t), unet_kwargs(cond, resolution), tie_weights=False).sample  # no tied weights in a UNet


def guided_parts(unet, z: torch.Tensor, t, uncond: Conditioning, cond: Conditioning, scale: float, resolution: int,
                 counter: EvalCounter | None = None, weights: Weights = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance, unconditional and conditional in one batch: (guided, conditional), each (B, C, h, w) in
    fp32. The combination is made in fp32 whatever the forward's precision (a bf16 difference of two close predictions
    loses most of its bits). A guidance-distilled model (FLUX.1-dev) makes one forward on `cond` at its default guidance input
    (FluxPipeline's 3.5), `scale` unused: both parts are that prediction, the same every other forward of a run makes, so
    a trajectory's conditional half is still a free target for its latents."""
    b = z.shape[0]
    if guidance_distilled(unet):  # FLUX.1-dev: guidance is an input of the model, one forward on the prompt alone
        out = predict(unet, z, t, cond, resolution, counter, weights).float()
        return out, out
    both = Conditioning.cat([uncond, cond])
    out = predict(unet, torch.cat([z, z]), t, both, resolution, counter, weights).float()
    out_uncond, out_cond = out[:b], out[b:]
    return out_uncond + scale * (out_cond - out_uncond), out_cond


def guided(unet, z: torch.Tensor, t, uncond: Conditioning, cond: Conditioning, scale: float, resolution: int,
           counter: EvalCounter | None = None, weights: Weights = None) -> torch.Tensor:
    """Classifier-free guidance, unconditional and conditional in one batch: (B, C, h, w), fp32."""
    return guided_parts(unet, z, t, uncond, cond, scale, resolution, counter, weights)[0]


def negative_guided(unet, z: torch.Tensor, t: torch.Tensor, without: Conditioning, concept: Conditioning, eta: float,
                    resolution: int, counter: EvalCounter | None = None, weights: Weights = None,
                    concept_eps: torch.Tensor | None = None, spare: Conditioning | None = None) -> torch.Tensor:
    """ESD's target, eps(z, w) - eta * (eps(z, c) - eps(z, w)), in fp32: the prediction without the concept, pushed away
    from it. `concept_eps`: eps(z, c) already at hand (a trajectory's conditional half); otherwise in the same call.
    `spare`: a neighbour's prompt n; the push loses, per sample, its component along n's own direction eps(z, n) - eps(z, w)
    where the two point the same way (`spared`): what the concept shares with its neighbour is not pushed away."""
    asked = [without] + ([concept] if concept_eps is None else []) + ([spare] if spare is not None else [])
    n = len(asked)
    out = predict(unet, torch.cat([z] * n), torch.cat([t] * n), Conditioning.cat(asked), resolution, counter, weights).float().chunk(n)
    e_w, e_c = out[0], (out[1] if concept_eps is None else concept_eps.float())
    push = e_c - e_w
    if spare is not None:
        push = spared(push, out[-1] - e_w)
    return e_w - eta * push


def spared(push: torch.Tensor, neighbour: torch.Tensor) -> torch.Tensor:
    """`push` without its component along `neighbour`, per sample, where their inner product is positive (as PCGrad
    removes a conflicting component): push - max(0, <push, n>) / ||n||^2 * n."""
    dims = tuple(range(1, push.dim()))
    dot = (push * neighbour).sum(dims, keepdim=True)
    norm = neighbour.pow(2).sum(dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return push - dot.clamp_min(0) / norm * neighbour


@torch.no_grad()
def ddim_trajectory(unet, scheduler, z: torch.Tensor, uncond: Conditioning, cond: Conditioning, *, scale: float,
                    num_steps: int, keep: list[int], resolution: int, counter: EvalCounter | None = None,
                    weights: Weights = None, with_cond: bool = False) -> dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
    """Run DDIM (eta 0) from z_T and return {i: z after i steps} for each i in `keep`.

    Stops as soon as the last wanted latent is reached: index k costs k guided steps
    (0 for z_T itself), never the full trajectory. `with_cond`: {i: (z_i, eps(z_i, t_i, cond))} instead, the
    conditional half of the guided call made at z_i anyway (one more call for the last index): with the weights fixed,
    that is a free target for z_i (the retain term's).
    """
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps  # on the CPU, where the scheduler indexes its own tables with them
    on_device = timesteps.to(z.device)  # for the UNet: one copy per trajectory instead of one per call
    wanted, last = set(keep), max(keep)
    out: dict = {}
    for i, t in enumerate(timesteps):
        if i == last and not with_cond:
            out[i] = z.clone()
            break
        eps, eps_cond = guided_parts(unet, z, on_device[i], uncond, cond, scale, resolution, counter, weights)
        if i in wanted:
            out[i] = (z.clone(), eps_cond) if with_cond else z.clone()
        if i == last:
            break
        z = scheduler.step(eps, t, z.float()).prev_sample.to(z.dtype)
    return out


def harvest(unet, scheduler, uncond: Conditioning, cond: Conditioning, *, guidance: float, num_steps: int, reuse: int,
            latent_shape: tuple[int, ...], resolution: int, generators: list[torch.Generator], device, teacher: Weights,
            counter: EvalCounter | None = None, pick_weights: torch.Tensor | None = None,
            with_cond: bool = False) -> list[list[tuple]]:
    """Sample one teacher trajectory per generator (one sample stream each), all in one batch, and return each
    stream's `reuse` latents as [(z_k (1, C, h, w), k), ...] with k ~ U{0..K-1} without repeats (or drawn with
    `pick_weights` over 0..K-1). `cond` holds one row per stream (or one row for all). Each stream draws its picks and
    then its noise from its own generator, so a stream's latents do not depend on which streams share its batch
    (up to float reduction order). `teacher` names the weights the no-grad trajectory runs with (None: the UNet's own).
    `with_cond`: each item is (z_k, k, eps_teacher(z_k, t_k, cond)) (erase.engine.sampling.ddim_trajectory)."""
    picks, noise = [], []
    for g in generators:
        if pick_weights is None:
            picks.append(torch.randperm(num_steps, generator=g)[:reuse].tolist())
        else:
            picks.append(torch.multinomial(pick_weights, reuse, replacement=False, generator=g).tolist())
        noise.append(torch.randn(latent_shape, generator=g))
    z_T = torch.cat(noise).to(device)
    b = len(generators)
    uncond, cond = (c if c.embeds.shape[0] == b else c.repeat(b) for c in (uncond, cond))
    latents = ddim_trajectory(unet, scheduler, z_T, uncond, cond, scale=guidance, num_steps=num_steps,
                              keep=sorted({k for p in picks for k in p}), resolution=resolution, counter=counter, weights=teacher,
                              with_cond=with_cond)
    if with_cond:
        return [[(latents[k][0][i : i + 1], k, latents[k][1][i : i + 1]) for k in p] for i, p in enumerate(picks)]
    return [[(latents[k][i : i + 1], k) for k in p] for i, p in enumerate(picks)]


def beta_weights(num_steps: int) -> torch.Tensor:
    """P(k) for k = 0..K-1 when k/K ~ Beta(3, 3): the mass of each of K equal bins (CDF 10x^3 - 15x^4 + 6x^5)."""
    x = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    cdf = 10 * x**3 - 15 * x**4 + 6 * x**5
    return (cdf[1:] - cdf[:-1]).float()


def take(pending: list[list[tuple]], refill) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One latent from each stream's queue, as a batch (z (B, C, h, w), k (B,), and the items' free targets (B, C, h, w)
    where they carry one, else None). The streams whose queue is empty are refilled together first: `refill(indices)`
    returns their new latents (one batched `harvest`). Queues are refilled in place, so a queue that also sits in a dict
    (per prompt) stays the one the dict holds."""
    empty = [i for i, q in enumerate(pending) if not q]
    if empty:
        for i, fresh in zip(empty, refill(empty)):
            pending[i].extend(fresh)
    items = [q.pop(0) for q in pending]
    extra = torch.cat([item[2] for item in items]) if len(items[0]) > 2 else None
    return torch.cat([item[0] for item in items]), torch.tensor([item[1] for item in items]), extra


def queues_state(pending: list[dict[str, list[tuple]]]) -> list[dict[str, list[tuple]]]:
    """Per-stream, per-prompt queues of harvested items as a resumable state, tensors on the CPU (queued tensors are never
    changed in place, so the lists are the only thing a snapshot has to copy)."""
    return [{p: [tuple(x.cpu() if torch.is_tensor(x) else x for x in item) for item in q] for p, q in stream.items()}
            for stream in pending]


def load_queues(state: list[dict[str, list[tuple]]], device) -> list[dict[str, list[tuple]]]:
    return [{p: [tuple(x.to(device) if torch.is_tensor(x) else x for x in item) for item in q] for p, q in stream.items()}
            for stream in state]
