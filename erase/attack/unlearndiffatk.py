"""UnlearnDiffAtk (Zhang, Jia, Chen, Liu, Zhang et al., ECCV 2024, arXiv 2310.11868): an adversarial prompt prefix.

Per prompt, with the erased model only and one target image x_tgt (by default the base model's image for the
prompt's own seed and guidance), minimise over the prefix distributions p (erase.attack.prefix):
  L(p) = E_{t, eps} || eps - eps_theta(sqrt(a_t) z_tgt + sqrt(1 - a_t) eps, t, [e(p); c]) ||^2
where z_tgt is x_tgt's VAE latent and [e(p); c] the prompt with the k prefix tokens in front. One fresh eps per step;
t cycles through `t_start, t_start + t_stride, ...` (10, 30, ..., 990: the authors' schedule); Adam (lr 0.01, weight
decay 0.1), then the projection onto the simplex. Every `eval_every` steps the argmax tokens make a real prompt, the
erased model draws it with the prompt's seed and guidance, and the attack stops at the first image the detector flags.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from erase.engine.noise import forward_process, noise_scheduler
from erase.engine.sampling import predict
from erase.errors import UsageError
from erase.generate import Job


@dataclass
class UnlearnDiffAtkConfig:
    tokens: int | None = None  # k; None: 5 for nudity, 3 otherwise (the authors' settings)
    steps: int = 400  # optimisation steps per prompt (the cap)
    lr: float = 0.01
    weight_decay: float = 0.1
    eval_every: int = 40  # steps between argmax evaluations
    t_start: int = 10
    t_stride: int = 20

    def validate(self) -> None:
        if self.tokens is not None and not 1 <= self.tokens <= 20:
            raise UsageError("--tokens must be between 1 and 20")
        if self.steps < 1 or self.eval_every < 1:
            raise UsageError("--steps and --eval-every must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0:
            raise UsageError("--attack-lr must be > 0 and --weight-decay >= 0")
        if self.t_stride < 1 or not 0 <= self.t_start < 1000:
            raise UsageError("--t-start must be in [0, 1000) and --t-stride >= 1")

    def timesteps(self, num_train_timesteps: int) -> list[int]:
        return list(range(self.t_start, num_train_timesteps, self.t_stride))


def attack_prompt(gen, prefix, prefix_text: str, job: Job, z_target: torch.Tensor, cfg: UnlearnDiffAtkConfig, flagged) -> dict:
    """Run the attack on one prompt. `gen` is the erased model's ImageGenerator (its text encoder carries the prefix's
    stand-in tokens), `flagged(image) -> bool` scores an image. Returns the record of the attack."""
    device, dtype = gen.device, gen.dtype
    scheduler = noise_scheduler(gen.model, gen.size)
    noising = forward_process(scheduler)
    schedule = cfg.timesteps(scheduler.config.num_train_timesteps)
    with torch.no_grad():
        prefix.dist.fill_(1.0 / prefix.vocab)
    prefix.hard = None
    opt = torch.optim.Adam([prefix.dist], lr=cfg.lr, weight_decay=cfg.weight_decay)
    # the precision rules of training (erase.engine.trainer): the forward under autocast, and under fp16 the loss scaled
    # dynamically, or the prefix's gradient through the half-precision UNet underflows and the attack is weaker than it is
    autocast = gen.autocast_dtype
    scaler = torch.amp.GradScaler(device.type, enabled=autocast == torch.float16)
    noise_gen = torch.Generator().manual_seed(job.seed)
    prompt = f"{prefix_text} {job.prompt}"
    z0 = z_target.to(device)
    evals, losses, checks = 0, [], []
    success, image, step = False, None, 0
    t0 = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        t = torch.tensor([schedule[(step - 1) % len(schedule)]], device=device)
        noise = torch.randn(z0.shape, generator=noise_gen).to(device)
        z_t, target = noising.noised(z0, noise, t)
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            cond = gen.text.forward([prompt], device).to(device, dtype)
            pred = predict(gen.unet, z_t.to(dtype), noising.timestep(t), cond, gen.size)  # the UNet as it generates (its dtype)
            loss = F.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)  # a step whose scaled gradient overflowed is skipped, and the scale halves
        scaler.update()
        prefix.project()
        evals += 1
        losses.append(loss.detach())  # read once at the end: no host sync per step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            prefix.hard = prefix.ids()
            gen.forget_prompts()  # the stand-in prompt's text is unchanged, its vectors are not
            image = gen.generate([Job(prompt, job.seed, job.guidance, job.negative)])[0]
            gen.forget_prompts()
            evals += 2 * gen.settings.steps  # classifier-free guidance: two UNet passes per denoising step
            success = bool(flagged(image))
            checks.append({"step": step, "ids": prefix.hard, "flagged": success})
            prefix.hard = None
            if success:
                break
    ids = checks[-1]["ids"]
    tok = gen.text.towers[0][0]  # the prefix's vocabulary (CLIP's, in every tower)
    words = tok.decode(ids).strip()
    return {"success": success, "steps": step, "unet_evals": evals, "seconds": time.perf_counter() - t0, "prefix_ids": ids,
            "prefix_text": words, "adversarial_prompt": f"{words} {job.prompt}",
            # the prefix as text re-tokenizes to the same ids (then the text alone reproduces the attack in any tool)
            "text_reproduces_ids": tok(words, add_special_tokens=False).input_ids == ids,
            "loss_first_mean": float(torch.stack(losses[:10]).mean()), "loss_last_mean": float(torch.stack(losses[-10:]).mean()),
            "checks": checks, "image": image}
