"""Stable Diffusion's discrete noise schedule in the k-diffusion (sigma) parameterisation.

SD was trained on 1000 discrete timesteps with "scaled linear" betas
(``sqrt(beta)`` linear from ``sqrt(0.00085)`` to ``sqrt(0.012)``).  A timestep ``t`` has
``alpha_bar_t = prod(1 - beta_i, i <= t)`` and the variance-exploding noise level
``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``; a latent at noise level sigma is
``x = x0 + sigma * eps``.  Samplers work on decreasing sigma sequences that end with 0.

Everything is computed in float64 and handed out as float32 tensors (the k-diffusion /
webui convention).  Nothing here keeps state: build a schedule with :func:`sd_schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import InvalidInput

SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_STEPS = 1000

SCHEDULE_KINDS = ("normal", "karras", "ddim_uniform")


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """A discrete-time diffusion schedule: ``sigmas[t]`` for integer ``t`` in ``[0, N)``.

    ``alphas_cumprod`` and ``sigmas`` are float64 and increasing in sigma with ``t``; treat
    them as read-only.
    """

    alphas_cumprod: torch.Tensor
    sigmas: torch.Tensor = field(init=False)
    log_sigmas: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        ac = self.alphas_cumprod.detach().to(torch.float64).clone()
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor of at least 2 values")
        sigmas = ((1.0 - ac) / ac).sqrt()
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())

    @classmethod
    def scaled_linear(
        cls, beta_start: float = SD_BETA_START, beta_end: float = SD_BETA_END, steps: int = SD_TRAIN_STEPS
    ) -> "DiscreteSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.numel())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    # -- conversions --------------------------------------------------------------------------
    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Continuous timestep of a noise level: linear interpolation in log-sigma between the
        two neighbouring integer timesteps (k-diffusion's DiscreteSchedule.sigma_to_t), clamped
        to ``[0, N-1]``.  Returns a float tensor of sigma's shape (float32 for non-tensors)."""
        s = torch.as_tensor(sigma)
        out_dtype = s.dtype if s.is_floating_point() else torch.float32
        log_sigma = s.to(torch.float64).log()
        ls = self.log_sigmas.to(log_sigma.device)
        # index of the last log-sigma <= log_sigma, kept where an upper neighbour exists
        low = (torch.searchsorted(ls, log_sigma.reshape(-1), right=True) - 1).clamp(0, ls.numel() - 2)
        low = low.reshape(log_sigma.shape)
        lo, hi = ls[low], ls[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        return (low.to(torch.float64) + w).to(out_dtype)

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level of a (possibly fractional) timestep: log-sigma interpolation."""
        tt = torch.as_tensor(t)
        out_dtype = tt.dtype if tt.is_floating_point() else torch.float32
        tt = tt.to(torch.float64).clamp(0, self.num_steps - 1)
        low = tt.floor().long().clamp(max=self.num_steps - 2)
        w = tt - low.to(torch.float64)
        ls = self.log_sigmas.to(tt.device)
        return ((1.0 - w) * ls[low] + w * ls[low + 1]).exp().to(out_dtype)

    # -- sigma sequences (decreasing, ending with 0) -------------------------------------------
    def normal(self, n: int) -> torch.Tensor:
        """k-diffusion's ``get_sigmas(n)``: n timesteps evenly spaced from N-1 down to 0."""
        _check_steps(n)
        t = torch.linspace(self.num_steps - 1, 0, n, dtype=torch.float64)
        return _append_zero(self.t_to_sigma(t))

    def karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. (2022) spacing between the schedule's sigma_max and sigma_min."""
        _check_steps(n)
        if not rho > 0:
            raise InvalidInput("rho", f"must be positive, got {rho}")
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        hi, lo = self.sigma_max ** (1.0 / rho), self.sigma_min ** (1.0 / rho)
        return _append_zero((hi + ramp * (lo - hi)) ** rho)

    def ddim_timesteps(self, n: int) -> torch.Tensor:
        """The webui's (and CompVis') "uniform" DDIM timesteps, increasing:
        ``range(0, N, N // n) + 1`` clipped to N-1.  When n does not divide N this yields a
        few more than n timesteps (e.g. 31 for n=30), exactly as the webui does."""
        _check_steps(n)
        stride = max(self.num_steps // n, 1)
        return torch.unique_consecutive((torch.arange(0, self.num_steps, stride) + 1).clamp(max=self.num_steps - 1))

    def ddim_uniform(self, n: int) -> torch.Tensor:
        """Sigmas at :meth:`ddim_timesteps` from the highest down, then 0 (ComfyUI's
        ``ddim_uniform``).  The last step goes from t=1 to a clean sample; the webui's own DDIM
        loop stops at t=1 instead, one evaluation earlier."""
        ts = self.ddim_timesteps(n)
        return _append_zero(self.sigmas[ts].flip(0))

    def sigmas_for(self, kind: str, steps: int) -> torch.Tensor:
        """One of :data:`SCHEDULE_KINDS` by name."""
        if kind == "normal":
            return self.normal(steps)
        if kind == "karras":
            return self.karras(steps)
        if kind == "ddim_uniform":
            return self.ddim_uniform(steps)
        raise InvalidInput("schedule", f"unknown schedule '{kind}'; choose one of: {', '.join(SCHEDULE_KINDS)}")

    def img2img_sigmas(self, kind: str, steps: int, strength: float) -> torch.Tensor:
        """The tail of the full ``steps`` sequence that an img2img run at ``strength`` samples.

        As the AUTOMATIC1111 webui (without "fix steps"): ``t_enc = int(min(strength, 0.999) *
        steps)`` and the run takes ``sigmas[steps - t_enc - 1:]``, i.e. ``t_enc + 1`` steps
        (always at least one) starting at noise level ``result[0]``.  The init latent is noised
        as ``x0 + noise * result[0]``.
        """
        return img2img_tail(self.sigmas_for(kind, steps), steps, strength)


def img2img_tail(full: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The part of a full ``steps``-step sigma sequence (ending in 0) that img2img at
    ``strength`` runs; see :meth:`DiscreteSchedule.img2img_sigmas`."""
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise InvalidInput("strength", f"must be a number in [0, 1], got {strength!r}")
    t_enc = int(min(float(strength), 0.999) * steps)
    run = min(t_enc + 1, full.numel() - 1)
    return full[full.numel() - 1 - run :].clone()


def sd_schedule() -> DiscreteSchedule:
    """Stable Diffusion 1.x/2.x's training schedule (scaled linear 0.00085 -> 0.012, 1000 steps)."""
    return DiscreteSchedule.scaled_linear(SD_BETA_START, SD_BETA_END, SD_TRAIN_STEPS)


def _check_steps(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput("steps", f"must be a positive integer, got {n!r}")


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)]).to(torch.float32)
