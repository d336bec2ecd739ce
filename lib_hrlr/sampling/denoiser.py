"""From an eps-predicting UNet to a k-diffusion denoiser with classifier-free guidance.

For a latent ``x = x0 + sigma * eps`` the UNet sees ``c_in * x`` with ``c_in = 1/sqrt(sigma²+1)``
(the variance-preserving latent it was trained on) at the continuous timestep
``t = sigma_to_t(sigma)`` and predicts ``eps``; the denoised estimate is ``x - sigma * eps``.

Latents and everything the sampler keeps stay float32.  Only the UNet's inputs are cast to
the compute dtype (fp16/bf16 weights) and its output is cast back to float32 right away,
so an fp32 latent is never fed to a half-precision UNet.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ..errors import InvalidInput
from .schedule import DiscreteSchedule

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class EpsDenoiser:
    """``EpsDenoiser(unet, schedule, cond, uncond, cfg_scale)(x, sigma) -> denoised``.

    ``unet(x, timesteps, context) -> eps`` with x and context in ``dtype`` and timesteps a
    float32 ``(B,)`` tensor.  ``cond`` / ``uncond`` are ``(1, T, ctx)`` conditionings of the
    same T.  Cond and uncond are evaluated in one batched UNet call; with ``cfg_scale == 1``
    the uncond half is skipped (guidance would cancel it).

    :meth:`denoise_batch` is the batched primitive :class:`MixtureDenoiser` builds on.

    SDXL: ``added`` / ``added_uncond`` are the UNet's ``(1, adm)`` ADM vectors for the prompt
    and the negative (:func:`~lib_hrlr.models.unet.adm_vector`); the UNet is then called as
    ``unet(x, timesteps, context, y)``.
    ``unet_calls`` / ``samples`` count UNet invocations and the samples (batch rows) they held.
    ``max_samples`` caps the rows of one UNet call: a larger batch (e.g. a crop's cond and
    uncond halves when the budget fits only one sample's activations) is run in several
    calls of at most that many rows, whose outputs are concatenated (None: no cap).
    """

    def __init__(
        self,
        unet: EpsModel,
        schedule: DiscreteSchedule,
        cond: torch.Tensor | None = None,
        uncond: torch.Tensor | None = None,
        cfg_scale: float = 7.0,
        dtype: torch.dtype = torch.float32,
        added: torch.Tensor | None = None,
        added_uncond: torch.Tensor | None = None,
        max_samples: int | None = None,
    ):
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise InvalidInput("max_samples", f"must be None or an integer >= 1, got {max_samples!r}")
        if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float)) or not math.isfinite(cfg_scale):
            raise InvalidInput("cfg_scale", f"must be a finite number, got {cfg_scale!r}")
        if cfg_scale != 1.0 and cond is not None and uncond is None:
            raise InvalidInput("negative_prompt", "classifier-free guidance needs the negative conditioning")
        self.unet = unet
        self.schedule = schedule
        self.cond = cond
        self.uncond = uncond
        self.cfg_scale = float(cfg_scale)
        self.dtype = dtype
        self.added = added
        self.added_uncond = added_uncond
        self.max_samples = max_samples
        self.unet_calls = 0
        self.samples = 0

    @property
    def uses_uncond(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def samples_per_job(self) -> int:
        """UNet batch rows one denoised crop costs: 2 with guidance, 1 without."""
        return 2 if self.uses_uncond else 1

    def reset_counters(self) -> None:
        self.unet_calls = 0
        self.samples = 0

    def eps(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
            y: torch.Tensor | None = None) -> torch.Tensor:
        """One UNet call on ``x`` (float32, B rows) at one noise level; returns float32 eps.
        ``y``: SDXL's (B, adm) ADM vectors, passed to the UNet as its fourth argument."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(())
        c_in = torch.rsqrt(sigma.double() ** 2 + 1.0).float()
        t = self.schedule.sigma_to_t(sigma.double()).float().to(x.device)
        rows = int(x.shape[0])
        step = min(rows, self.max_samples or rows)
        outs = []
        for i in range(0, rows, step):
            part = slice(i, i + step)
            n = len(range(*part.indices(rows)))
            args = [(x[part] * c_in).to(self.dtype), t.expand(n).contiguous(),
                    _rows(context, part, rows).to(device=x.device, dtype=self.dtype)]
            if y is not None:
                args.append(_rows(y, part, rows).to(device=x.device, dtype=self.dtype))
            out = self.unet(*args)
            self.unet_calls += 1
            self.samples += n
            if out.shape != args[0].shape:
                raise RuntimeError(f"UNet returned shape {tuple(out.shape)} for input {tuple(args[0].shape)}")
            outs.append(out.to(torch.float32))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def denoise_batch(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        conds: torch.Tensor,
        uncond: torch.Tensor | None = None,
        added: torch.Tensor | None = None,
        added_uncond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided denoised estimates of N crops in one UNet call of ``samples_per_job * N`` rows.

        ``x`` float32 (N, C, h, w); ``conds`` (N, T, ctx); ``uncond`` (1 or N, T, ctx);
        SDXL: ``added`` / ``added_uncond`` (1 or N, adm).
        """
        if x.dtype != torch.float32:
            raise InvalidInput("x", f"latents must be float32, got {x.dtype}")
        n = x.shape[0]
        if conds.shape[0] != n:
            raise ValueError(f"{conds.shape[0]} conditionings for {n} crops")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(())
        if self.uses_uncond:
            if uncond is None:
                raise InvalidInput("negative_prompt", "classifier-free guidance needs the negative conditioning")
            if uncond.shape[1:] != conds.shape[1:]:
                raise InvalidInput(
                    "negative_prompt",
                    f"conditioning shape {tuple(uncond.shape[1:])} differs from the prompt's {tuple(conds.shape[1:])}",
                )
            unconds = uncond.expand(n, *uncond.shape[1:]) if uncond.shape[0] == 1 else uncond
            y = None
            if added is not None:
                if added_uncond is None:
                    raise InvalidInput("negative_prompt", "SDXL guidance needs the negative prompt's pooled embedding")
                y = torch.cat([added.expand(n, -1), added_uncond.expand(n, -1)])
            eps = self.eps(torch.cat([x, x]), sigma, torch.cat([conds, unconds.to(conds.dtype)]), y)
            eps = self.guide(eps[:n], eps[n:])
        else:
            eps = self.eps(x, sigma, conds, None if added is None else added.expand(n, -1))
        return self.to_denoised(x, sigma, eps)

    def guide(self, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
        return eps_uncond + (eps_cond - eps_uncond) * self.cfg_scale

    @staticmethod
    def to_denoised(x: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``x0 = x - sigma * eps`` (float32)."""
        return x - eps * torch.as_tensor(sigma, dtype=torch.float32, device=x.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.cond is None:
            raise InvalidInput("prompt", "this denoiser was built without a conditioning")
        conds = self.cond.expand(x.shape[0], *self.cond.shape[1:]) if self.cond.shape[0] == 1 else self.cond
        return self.denoise_batch(x, sigma, conds, self.uncond, self.added, self.added_uncond)


def _rows(t: torch.Tensor, part: slice, rows: int) -> torch.Tensor:
    """``t``'s rows of ``part`` when it has one row per sample; a shared (1, ...) tensor as is."""
    return t[part] if t.shape[0] == rows else t


def stack_contexts(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``(1, T, ctx)`` conditionings into ``(N, T, ctx)``, checking they agree."""
    if not contexts:
        raise InvalidInput("prompt", "no conditioning given")
    shape = tuple(contexts[0].shape[1:])
    for i, c in enumerate(contexts):
        if c.ndim != 3 or c.shape[0] != 1 or tuple(c.shape[1:]) != shape:
            raise InvalidInput(
                "prompt", f"conditioning {i} has shape {tuple(c.shape)}; all must be (1, {shape[0]}, {shape[1]})"
            )
    return torch.cat(list(contexts))
