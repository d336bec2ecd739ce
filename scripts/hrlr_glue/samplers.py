"""The webui's k-diffusion samplers and schedulers as an engine SamplerSpec (imports the webui)."""

from __future__ import annotations

import inspect

import torch
from modules import sd_schedulers, shared

from lib_hrlr.errors import Interrupted, InvalidInput
from lib_hrlr.sampling.samplers import SamplerSpec
from lib_hrlr.sampling.schedule import sd_schedule

# k-diffusion samplers with the plain (model, x, sigmas, extra_args, callback, disable) signature
EXCLUDED_SAMPLERS = {"DPM fast", "DPM adaptive"}

def sampler_names() -> list[str]:
    from modules import sd_samplers_kdiffusion

    return [d.name for d in sd_samplers_kdiffusion.samplers_data_k_diffusion if d.name not in EXCLUDED_SAMPLERS]


def scheduler_names() -> list[str]:
    return [s.label for s in sd_schedulers.schedulers]


def webui_sampler(name: str, scheduler: str, seed: int) -> SamplerSpec:
    """The webui's k-diffusion sampler ``name`` on ``scheduler``, as an engine SamplerSpec."""
    import k_diffusion.external
    import k_diffusion.sampling
    from modules import sd_samplers_kdiffusion

    data = {d.name: d for d in sd_samplers_kdiffusion.samplers_data_k_diffusion}
    if name not in data or name in EXCLUDED_SAMPLERS:
        raise InvalidInput("sampler_name", f"unknown sampler '{name}'; choose one of: {', '.join(sampler_names())}")
    funcname = next(f for label, f, _, _ in sd_samplers_kdiffusion.samplers_k_diffusion if label == name)
    func = funcname if callable(funcname) else getattr(k_diffusion.sampling, funcname)
    options = data[name].options
    sched_map = {s.label: s for s in sd_schedulers.schedulers}
    sched_map.update({s.name: s for s in sd_schedulers.schedulers})
    if scheduler not in sched_map:
        raise InvalidInput("scheduler", f"unknown scheduler '{scheduler}'; choose one of: {', '.join(scheduler_names())}")
    sch = sched_map[scheduler]
    if sch.name == "automatic":
        sch = sd_schedulers.schedulers_map.get(options.get("scheduler") or "", None)
    discard = bool(options.get("discard_next_to_last_sigma", False))
    # the SD 1.x discrete schedule as k-diffusion sees it (what CompVisDenoiser builds from the model)
    ours = sd_schedule()
    inner = k_diffusion.external.DiscreteSchedule(ours.sigmas.float(), quantize=shared.opts.enable_quantization)

    def sigmas(n: int) -> torch.Tensor:
        steps = n + 1 if discard else n
        if sch is None or sch.function is None:
            s = inner.get_sigmas(steps)
        else:
            kw = {"sigma_min": inner.sigmas[0].item(), "sigma_max": inner.sigmas[-1].item()}
            if sch.need_inner_model:
                kw["inner_model"] = inner
            s = sch.function(n=steps, **kw, device="cpu")
        s = s.float().cpu()
        if discard:
            s = torch.cat([s[:-2], s[-1:]])
        return s

    params = inspect.signature(func).parameters

    def run(den, x, sigmas, *, noise=None, callback=None, should_stop=None):
        def model(x, sigma, **_):
            if should_stop is not None and should_stop():
                raise Interrupted()
            return den(x, sigma.reshape(-1)[0])

        kw = {}
        if "noise_sampler" in params and noise is not None and not options.get("brownian_noise"):
            kw["noise_sampler"] = lambda s, s_next: noise(x.shape)
        torch.manual_seed(seed)  # brownian / default noise samplers draw from the global RNG
        return func(model, x, sigmas, extra_args={}, callback=callback, disable=True, **kw)

    schedule = sch.label if sch is not None else "Automatic"
    return SamplerSpec(name=name, fn=run, schedule=schedule.lower(), label=name,
                       stochastic=bool(options.get("uses_ensd") or options.get("brownian_noise")), sigmas=sigmas)

