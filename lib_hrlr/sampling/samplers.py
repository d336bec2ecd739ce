"""k-diffusion-style samplers over a denoiser ``D(x, sigma) -> x0 estimate``.

Every sampler has the signature::

    fn(denoiser, x, sigmas, *, noise, callback=None, should_stop=None, **options) -> x

* ``x`` is the starting latent, float32 ``(1, C, H, W)`` already at noise level ``sigmas[0]``;
* ``sigmas`` a decreasing 1-D sequence ending with 0 (see :mod:`.schedule`); the sampler makes
  ``len(sigmas) - 1`` steps and one denoiser call per step;
* ``noise(shape) -> Tensor`` supplies standard-normal noise for ancestral samplers (callers
  draw it for the whole canvas from a seeded generator, so results do not depend on tiling);
  deterministic samplers never call it;
* ``callback(info)`` gets ``{"i", "steps", "sigma", "sigma_next", "x", "denoised"}`` after each step;
* ``should_stop()`` is polled before every step; a true answer raises :class:`Interrupted`.

Scalar coefficients are computed in float64 from the sigma values; tensors stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from ..errors import InvalidInput, Interrupted

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseSource = Callable[[tuple], torch.Tensor]
Callback = Optional[Callable[[Mapping[str, Any]], None]]
StopCheck = Optional[Callable[[], bool]]


def _as_sigma_list(sigmas: torch.Tensor) -> list[float]:
    s = torch.as_tensor(sigmas).detach().to(torch.float64).cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise InvalidInput("sigmas", "need a 1-D sequence of at least 2 noise levels (ending with 0)")
    values = [float(v) for v in s]
    if any(not math.isfinite(v) or v < 0 for v in values):
        raise InvalidInput("sigmas", "noise levels must be finite and non-negative")
    if any(b > a for a, b in zip(values, values[1:])):
        raise InvalidInput("sigmas", "noise levels must not increase")
    if any(v == 0.0 for v in values[:-1]):
        raise InvalidInput("sigmas", "only the last noise level may be 0")
    return values


def _check_x(x: torch.Tensor) -> None:
    if x.dtype != torch.float32:
        raise InvalidInput("x", f"latents must be float32, got {x.dtype}")


def _sigma_tensor(value: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=like.device)


def _denoise(denoiser: Denoiser, x: torch.Tensor, sigma: float) -> torch.Tensor:
    d = denoiser(x, _sigma_tensor(sigma, x))
    if d.shape != x.shape:
        raise RuntimeError(f"denoiser returned shape {tuple(d.shape)} for input {tuple(x.shape)}")
    return d.to(torch.float32)


def _poll(should_stop: StopCheck) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted()


def _report(callback: Callback, i: int, steps: int, sigma: float, sigma_next: float, x, denoised) -> None:
    if callback is not None:
        callback({"i": i, "steps": steps, "sigma": sigma, "sigma_next": sigma_next, "x": x, "denoised": denoised})


def _draw(noise: NoiseSource, x: torch.Tensor) -> torch.Tensor:
    z = noise(tuple(x.shape))
    if tuple(z.shape) != tuple(x.shape):
        raise RuntimeError(f"noise source returned shape {tuple(z.shape)}, wanted {tuple(x.shape)}")
    return z.to(device=x.device, dtype=torch.float32)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step from ``sigma`` to ``sigma_next`` into a deterministic step down to
    ``sigma_down`` and fresh noise of std ``sigma_up`` (``sigma_down² + sigma_up² = sigma_next²``).

    ``sigma_up = eta * sigma_next * sqrt(1 - sigma_next² / sigma²)`` (capped at sigma_next) is the
    DDIM variance of Song et al. written in sigma space, so eta=1 is DDPM-like ancestral
    sampling and eta=0 the deterministic DDIM / Euler step.
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    up = eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0))
    up = min(up, sigma_next)
    down = math.sqrt(max(sigma_next**2 - up**2, 0.0))
    return down, up


def euler(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource | None = None,
          callback: Callback = None, should_stop: StopCheck = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x, sigma)) / sigma``."""
    _check_x(x)
    s = _as_sigma_list(sigmas)
    steps = len(s) - 1
    for i in range(steps):
        _poll(should_stop)
        denoised = _denoise(denoiser, x, s[i])
        if s[i + 1] == 0.0:
            x = denoised
        else:
            d = (x - denoised) / s[i]
            x = x + d * (s[i + 1] - s[i])
        _report(callback, i, steps, s[i], s[i + 1], x, denoised)
    return x


def _ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, eta: float, noise: NoiseSource | None,
               callback: Callback, should_stop: StopCheck) -> torch.Tensor:
    _check_x(x)
    if not (math.isfinite(eta) and eta >= 0.0):
        raise InvalidInput("eta", f"must be a non-negative number, got {eta!r}")
    s = _as_sigma_list(sigmas)
    steps = len(s) - 1
    for i in range(steps):
        _poll(should_stop)
        denoised = _denoise(denoiser, x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0.0:
            x = denoised
        else:
            x = x + (x - denoised) * ((down - s[i]) / s[i])
        if up > 0.0:
            if noise is None:
                raise InvalidInput("noise", "a stochastic sampler needs a noise source")
            x = x + _draw(noise, x) * up
        _report(callback, i, steps, s[i], s[i + 1], x, denoised)
    return x


def euler_ancestral(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource | None = None,
                    callback: Callback = None, should_stop: StopCheck = None, eta: float = 1.0) -> torch.Tensor:
    """Euler step down to ``sigma_down``, then fresh noise of std ``sigma_up`` ("Euler a")."""
    return _ancestral(denoiser, x, sigmas, eta, noise, callback, should_stop)


def ddim(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource | None = None,
         callback: Callback = None, should_stop: StopCheck = None, eta: float = 0.0) -> torch.Tensor:
    """DDIM (Song et al. 2020) in sigma space.

    Dividing DDIM's update ``x' = sqrt(a')·x0 + sqrt(1 - a' - s²)·eps + s·z`` by ``sqrt(a')``
    gives ``x'/sqrt(a') = x0 + sigma_down·eps + sigma_up·z`` with :func:`ancestral_step`'s split,
    so eta=0 is the deterministic DDIM step (identical to Euler on the same sigmas) and eta=1
    equals Euler-ancestral.  What makes it "DDIM" in the registry is the schedule
    (:meth:`DiscreteSchedule.ddim_uniform`).
    """
    return _ancestral(denoiser, x, sigmas, eta, noise, callback, should_stop)


def dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseSource | None = None,
             callback: Callback = None, should_stop: StopCheck = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep data-prediction solver.

    With ``lambda = -log(sigma)`` and ``h = lambda_next - lambda``, a step is
    ``x' = (sigma'/sigma)·x + (1 - sigma'/sigma)·D`` where D is the current denoised estimate,
    corrected by the previous one once available: ``D = (1 + 1/(2r))·D_i - 1/(2r)·D_{i-1}``,
    ``r = h_{i-1} / h_i``.  The first step and the step to sigma=0 are first order.
    """
    _check_x(x)
    s = _as_sigma_list(sigmas)
    steps = len(s) - 1
    prev_denoised: torch.Tensor | None = None
    for i in range(steps):
        _poll(should_stop)
        denoised = _denoise(denoiser, x, s[i])
        if s[i + 1] == 0.0:
            x = denoised
        else:
            h = math.log(s[i] / s[i + 1])
            ratio = s[i + 1] / s[i]  # = exp(-h)
            h_last = math.log(s[i - 1] / s[i]) if prev_denoised is not None else 0.0
            if h_last == 0.0:  # first step (or a repeated sigma): first order
                d = denoised
            else:
                c = h / (2.0 * h_last)  # 1 / (2r)
                d = denoised * (1.0 + c) - prev_denoised * c
            x = x * ratio + d * (1.0 - ratio)
        prev_denoised = denoised
        _report(callback, i, steps, s[i], s[i + 1], x, denoised)
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as the UI offers it: its id, the step function, the sigma schedule kind
    (:data:`lib_hrlr.sampling.schedule.SCHEDULE_KINDS`) it runs on and the webui's label;
    ``stochastic`` samplers draw from the ``noise`` source."""

    name: str
    fn: Callable[..., torch.Tensor]
    schedule: str
    label: str
    stochastic: bool = False
    # the full sigma sequence for n steps (ending in 0); None = ``schedule`` on the SD schedule.
    # Lets a caller bring its own scheduler (the webui's) with its own sampler functions.
    sigmas: Callable[[int], torch.Tensor] | None = None


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", euler, "normal", "Euler"),
    SamplerSpec("euler_a", euler_ancestral, "normal", "Euler a", stochastic=True),
    SamplerSpec("dpmpp_2m", dpmpp_2m, "normal", "DPM++ 2M"),
    SamplerSpec("dpmpp_2m_karras", dpmpp_2m, "karras", "DPM++ 2M Karras"),
    SamplerSpec("ddim", ddim, "ddim_uniform", "DDIM"),
)


def sampler_names() -> list[str]:
    return [spec.name for spec in SAMPLERS]


def get_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by id (``dpmpp_2m_karras``) or webui label (``DPM++ 2M Karras``),
    case-insensitively."""
    key = str(name).strip().lower()
    for spec in SAMPLERS:
        if key == spec.name or key == spec.label.lower():
            return spec
    choices = ", ".join(f"{spec.name} ('{spec.label}')" for spec in SAMPLERS)
    raise InvalidInput("sampler", f"unknown sampler '{name}'; choose one of: {choices}")
