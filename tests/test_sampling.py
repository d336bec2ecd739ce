"""Schedule, samplers and the eps -> denoiser wrapper, checked against closed forms and diffusers."""

import math

import pytest
import torch

from lib_hrlr.errors import Interrupted, InvalidInput
from lib_hrlr.sampling.denoiser import EpsDenoiser
from lib_hrlr.sampling.samplers import (
    SAMPLERS,
    ancestral_step,
    ddim,
    dpmpp_2m,
    euler,
    euler_ancestral,
    get_sampler,
)
from lib_hrlr.sampling.schedule import sd_schedule

SCHED = sd_schedule()


DIFFUSERS_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# -- toy problem: data ~ N(0, s²) per element, whose exact denoiser is linear -----------------
S2 = 0.25  # data variance


def gauss_denoiser(x, sigma):
    sigma = float(sigma)
    return x * (S2 / (S2 + sigma * sigma))


def exact_ode(x, sigma_from, sigma_to):
    """Probability-flow ODE solution for N(0, S2) data: x scales with sqrt(S2 + sigma²)."""
    return x * math.sqrt((S2 + sigma_to**2) / (S2 + sigma_from**2))


def gauss_eps_ve(x_ve, sigma):
    return (x_ve - gauss_denoiser(x_ve, sigma)) / float(sigma)


def start(sigma0, n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((1, 4, 32, n // 128), generator=g) * float(sigma0)


def zero_noise(shape):
    return torch.zeros(shape)


# -- schedule ------------------------------------------------------------------------------------
def test_schedule_endpoints_and_alphas():
    ac = SCHED.alphas_cumprod
    assert ac.shape == (1000,)
    beta0, beta999 = 1 - ac[0].item(), 1 - (ac[999] / ac[998]).item()
    assert beta0 == pytest.approx(0.00085, rel=1e-9)
    assert beta999 == pytest.approx(0.012, rel=1e-9)
    assert SCHED.sigma_min == pytest.approx(0.029167, abs=1e-5)
    assert SCHED.sigma_max == pytest.approx(14.614642, abs=1e-5)


def test_sigma_t_roundtrip_and_interpolation():
    t = torch.tensor([0.0, 1.0, 10.0, 499.25, 998.5, 999.0], dtype=torch.float64)
    assert torch.allclose(SCHED.sigma_to_t(SCHED.t_to_sigma(t)), t, atol=1e-9)
    # integer timesteps hit the table exactly
    assert torch.allclose(SCHED.t_to_sigma(torch.tensor([0.0, 500.0])), SCHED.sigmas[[0, 500]].float())
    # half way between t=0 and t=1 in log-sigma is the geometric mean
    mid = SCHED.t_to_sigma(torch.tensor(0.5, dtype=torch.float64)).item()
    assert mid == pytest.approx(math.sqrt(SCHED.sigmas[0].item() * SCHED.sigmas[1].item()), rel=1e-12)
    # out of range sigmas clamp to the ends
    assert SCHED.sigma_to_t(torch.tensor([0.0, 1e3])).tolist() == [0.0, 999.0]


def test_normal_matches_diffusers_euler_sigmas():
    from diffusers import EulerDiscreteScheduler

    for n in (10, 25, 50):
        ref = EulerDiscreteScheduler(timestep_spacing="linspace", **DIFFUSERS_SD)
        ref.set_timesteps(n)
        ours = SCHED.normal(n)
        assert ours.shape == (n + 1,) and ours[-1] == 0
        # diffusers interpolates sigma linearly between integer steps, k-diffusion in log space
        assert torch.allclose(ours, ref.sigmas, rtol=2e-4, atol=0)


def test_karras_matches_diffusers():
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(use_karras_sigmas=True, **DIFFUSERS_SD)
    ref.set_timesteps(20)
    ours = SCHED.karras(20)
    assert torch.allclose(ours, ref.sigmas, rtol=1e-4, atol=0)
    assert ours[0].item() == pytest.approx(SCHED.sigma_max, rel=1e-6)
    assert ours[-2].item() == pytest.approx(SCHED.sigma_min, rel=1e-6)


def test_ddim_uniform_is_webui_spacing():
    ts = SCHED.ddim_timesteps(20)
    assert ts.tolist() == list(range(1, 1000, 50))
    sig = SCHED.ddim_uniform(20)
    assert sig.shape == (21,) and sig[-1] == 0
    assert torch.allclose(sig[:-1], SCHED.sigmas[list(range(951, 0, -50))].float())
    # n not dividing 1000: the webui's stride 1000 // n gives extra timesteps
    assert SCHED.ddim_timesteps(30).numel() == 31
    # more steps than training timesteps: every timestep once, no repeated sigma
    assert SCHED.ddim_timesteps(2000).tolist() == list(range(1, 1000))


def test_img2img_tail_like_webui():
    full = SCHED.normal(20)
    tail = SCHED.img2img_sigmas("normal", 20, 0.5)  # t_enc = 10 -> sigmas[9:]
    assert torch.equal(tail, full[9:]) and tail.numel() - 1 == 11
    assert torch.equal(SCHED.img2img_sigmas("normal", 20, 1.0), full)  # capped at 0.999 -> 19
    assert torch.equal(SCHED.img2img_sigmas("normal", 20, 0.0), full[-2:])  # at least 1 step
    assert torch.equal(SCHED.img2img_sigmas("karras", 7, 0.75), SCHED.karras(7)[7 - 5 - 1 :])
    with pytest.raises(InvalidInput) as e:
        SCHED.img2img_sigmas("normal", 20, 1.5)
    assert e.value.field == "strength"
    with pytest.raises(InvalidInput) as e:
        SCHED.img2img_sigmas("bogus", 20, 0.5)
    assert e.value.field == "schedule"
    with pytest.raises(InvalidInput) as e:
        SCHED.normal(0)
    assert e.value.field == "steps"


# -- samplers vs hand-computed values ---------------------------------------------------------
def test_euler_two_steps_by_hand():
    s0, s1 = 3.0, 0.7
    x = torch.tensor([[[[1.5, -2.0]]]])
    a0, a1 = S2 / (S2 + s0 * s0), S2 / (S2 + s1 * s1)
    x1 = x + (x - a0 * x) / s0 * (s1 - s0)
    want = a1 * x1
    got = euler(gauss_denoiser, x, torch.tensor([s0, s1, 0.0]))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # one step to 0 is the denoised estimate itself
    assert torch.allclose(euler(gauss_denoiser, x, torch.tensor([s0, 0.0])), a0 * x)


def test_dpmpp_2m_three_steps_by_hand():
    s = [5.0, 1.2, 0.3, 0.0]
    x = torch.tensor([[[[1.0, -0.5, 2.0]]]])
    a = [S2 / (S2 + v * v) for v in s]
    # step 0: first order, x' = (s1/s0) x + (1 - s1/s0) D0
    d0 = a[0] * x
    x1 = (s[1] / s[0]) * x + (1 - s[1] / s[0]) * d0
    # step 1: second order with r = h0 / h1, h_i = log(s_i / s_{i+1})
    d1 = a[1] * x1
    h0, h1 = math.log(s[0] / s[1]), math.log(s[1] / s[2])
    r = h0 / h1
    dd = (1 + 1 / (2 * r)) * d1 - (1 / (2 * r)) * d0
    x2 = (s[2] / s[1]) * x1 + (1 - s[2] / s[1]) * dd
    # step 2: to sigma 0 -> denoised
    want = a[2] * x2
    got = dpmpp_2m(gauss_denoiser, x, torch.tensor(s))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    # and it is not first order (the correction matters)
    first_order = a[2] * ((s[2] / s[1]) * x1 + (1 - s[2] / s[1]) * d1)
    assert (got - first_order).abs().max() > 1e-3


def test_ancestral_step_split_and_euler_a_noise():
    s0, s1 = 2.0, 0.8
    down, up = ancestral_step(s0, s1, 1.0)
    assert down**2 + up**2 == pytest.approx(s1**2)
    assert down == pytest.approx(s1 * s1 / s0)  # eta=1: sigma_down = sigma_next² / sigma
    assert ancestral_step(s0, s1, 0.0) == (s1, 0.0)
    assert ancestral_step(s0, 0.0, 1.0) == (0.0, 0.0)

    x = torch.tensor([[[[1.0, -3.0]]]])
    a0 = S2 / (S2 + s0 * s0)
    deterministic = x + (x - a0 * x) / s0 * (down - s0)
    got0 = euler_ancestral(gauss_denoiser, x, torch.tensor([s0, s1]), noise=zero_noise)
    assert torch.allclose(got0, deterministic, rtol=1e-6)
    got1 = euler_ancestral(gauss_denoiser, x, torch.tensor([s0, s1]), noise=lambda shape: torch.ones(shape))
    assert torch.allclose(got1 - got0, torch.full_like(x, up), rtol=1e-5)

    shapes = []

    def recording(shape):
        shapes.append(shape)
        return torch.zeros(shape)

    euler_ancestral(gauss_denoiser, x, torch.tensor([s0, s1, 0.3, 0.0]), noise=recording)
    assert shapes == [tuple(x.shape)] * 2  # no noise after the step to 0


def test_ddim_eta0_equals_euler_and_eta1_equals_euler_a():
    sig = SCHED.ddim_uniform(10)
    x = start(sig[0])
    assert torch.allclose(ddim(gauss_denoiser, x, sig), euler(gauss_denoiser, x, sig), rtol=1e-5, atol=1e-6)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ddim(gauss_denoiser, x, sig, eta=1.0, noise=lambda s: torch.randn(s, generator=g1))
    b = euler_ancestral(gauss_denoiser, x, sig, noise=lambda s: torch.randn(s, generator=g2))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


# -- samplers: convergence on the toy problem ------------------------------------------------
@pytest.mark.parametrize("fn,order", [(euler, 1), (dpmpp_2m, 2), (ddim, 1)])
def test_deterministic_samplers_converge_with_their_order(fn, order):
    errs = []
    for n in (20, 40, 80):
        # steps uniform in log-sigma from sigma_max to sigma_min, no final jump to 0
        sig = torch.exp(torch.linspace(math.log(SCHED.sigma_max), math.log(SCHED.sigma_min), n + 1))
        x = start(sig[0])
        got = fn(gauss_denoiser, x, sig)
        want = exact_ode(x.double(), sig[0].item(), sig[-1].item())
        errs.append(((got.double() - want).abs().max() / want.abs().max()).item())
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert errs[2] < (2.5e-2 if order == 1 else 1e-3), errs
    for r in ratios:  # halving the step size divides the error by ~2**order
        assert 2**order * 0.85 < r < 2**order * 1.15, (errs, ratios)


@pytest.mark.parametrize("name,steps", [("euler", 400), ("dpmpp_2m", 200), ("dpmpp_2m_karras", 50), ("ddim", 400)])
def test_deterministic_samplers_reach_the_data_variance(name, steps):
    spec = get_sampler(name)
    sig = SCHED.sigmas_for(spec.schedule, steps)
    x = start(sig[0], n=16384)
    out = spec.fn(gauss_denoiser, x, sig, noise=zero_noise)
    want = exact_ode(x.double(), sig[0].item(), 0.0)
    assert (out.double() - want).abs().max().item() < 0.02 * want.abs().max().item()
    assert out.var().item() == pytest.approx(S2, rel=0.03)


def _euler_a_variance(sigmas, v0):
    """Exact output variance of Euler-ancestral on the Gaussian toy: each step maps
    x -> c·x + sigma_up·z with c = 1 + (1 - a)(sigma_down - sigma)/sigma, a = S2/(S2 + sigma²)."""
    v, s = v0, [float(t) for t in sigmas]
    for i in range(len(s) - 1):
        down, up = ancestral_step(s[i], s[i + 1], 1.0)
        c = 1 + (1 - S2 / (S2 + s[i] ** 2)) * (down - s[i]) / s[i]
        v = v * c * c + up * up
    return v


def test_euler_ancestral_reaches_the_data_variance():
    g = torch.Generator().manual_seed(1)
    sig = SCHED.normal(40)
    x = start(sig[0], n=65536, seed=2)
    out = euler_ancestral(gauss_denoiser, x, sig, noise=lambda s: torch.randn(s, generator=g))
    # the sampler's empirical variance is the one its update rule implies (0.78·S2 at 40 steps) ...
    assert out.var().item() == pytest.approx(_euler_a_variance(sig, x.var().item()), rel=0.03)
    # ... and that rule converges to the data variance as steps grow
    assert _euler_a_variance(SCHED.normal(4000), SCHED.sigma_max**2) == pytest.approx(S2, rel=0.01)
    # the result is not a deterministic function of x: it decorrelates from the ODE solution
    ode = euler(gauss_denoiser, x, sig)
    corr = torch.corrcoef(torch.stack([out.flatten(), ode.flatten()]))[0, 1].item()
    assert corr < 0.9


# -- samplers vs diffusers' schedulers -----------------------------------------------------
def test_euler_matches_diffusers():
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(timestep_spacing="linspace", **DIFFUSERS_SD)
    ref.set_timesteps(12)
    x = start(ref.sigmas[0])
    sample = x.clone()
    for i, t in enumerate(ref.timesteps):
        sample = ref.step(gauss_eps_ve(sample, ref.sigmas[i]), t, sample).prev_sample
    ours = euler(gauss_denoiser, x, ref.sigmas)
    assert (ours - sample).abs().max().item() < 1e-5


def test_euler_ancestral_matches_diffusers_with_the_same_noise():
    from diffusers import EulerAncestralDiscreteScheduler

    ref = EulerAncestralDiscreteScheduler(timestep_spacing="linspace", **DIFFUSERS_SD)
    ref.set_timesteps(12)
    x = start(ref.sigmas[0])
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sample = x.clone()
    for i, t in enumerate(ref.timesteps):
        sample = ref.step(gauss_eps_ve(sample, ref.sigmas[i]), t, sample, generator=g_ref).prev_sample
    ours = euler_ancestral(gauss_denoiser, x, ref.sigmas, noise=lambda s: torch.randn(s, generator=g_ours))
    assert (ours - sample).abs().max().item() < 1e-5


def test_dpmpp_2m_karras_matches_diffusers_dpmsolver():
    from diffusers import DPMSolverMultistepScheduler

    ref = DPMSolverMultistepScheduler(use_karras_sigmas=True, lower_order_final=False, **DIFFUSERS_SD)
    ref.set_timesteps(20)
    z = start(1.0)
    sample = z.clone()  # diffusers works on variance-preserving latents
    for i, t in enumerate(ref.timesteps):
        s = ref.sigmas[i].item()
        x_ve = sample * math.sqrt(1 + s * s)
        sample = ref.step(gauss_eps_ve(x_ve, s), t, sample).prev_sample
    sig = SCHED.karras(20)
    ours = dpmpp_2m(gauss_denoiser, z * math.sqrt(1 + sig[0].item() ** 2), sig)
    scale = sample.abs().max().item()
    assert (ours - sample).abs().max().item() < 1e-4 * scale


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_matches_diffusers_ddim(eta):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(set_alpha_to_one=True, clip_sample=False, steps_offset=1, timestep_spacing="leading", **DIFFUSERS_SD)
    ref.set_timesteps(20)
    sig = SCHED.ddim_uniform(20)
    assert ref.timesteps.tolist() == SCHED.ddim_timesteps(20).flip(0).tolist()
    z = start(1.0)
    g_ref, g_ours = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    sample = z.clone()
    for t in ref.timesteps:
        ac = ref.alphas_cumprod[int(t)].item()
        s = math.sqrt((1 - ac) / ac)
        eps = gauss_eps_ve(sample / math.sqrt(ac), s)
        sample = ref.step(eps, t, sample, eta=eta, generator=g_ref).prev_sample
    ours = ddim(gauss_denoiser, z * math.sqrt(1 + sig[0].item() ** 2), sig, eta=eta,
                noise=lambda s: torch.randn(s, generator=g_ours))
    assert (ours - sample).abs().max().item() < 2e-4 * sample.abs().max().item()


# -- control flow ------------------------------------------------------------------------------
def test_should_stop_interrupts_between_steps_and_callback_sees_each_step():
    calls, seen = [], []

    def counting(x, sigma):
        calls.append(float(sigma))
        return gauss_denoiser(x, sigma)

    sig = SCHED.normal(6)
    with pytest.raises(Interrupted):
        dpmpp_2m(counting, start(sig[0]), sig, callback=lambda info: seen.append(info["i"]),
                 should_stop=lambda: len(calls) >= 2)
    assert len(calls) == 2 and seen == [0, 1]
    assert calls == pytest.approx(sig[:2].tolist())


def test_sampler_input_validation():
    x = start(10.0)
    with pytest.raises(InvalidInput) as e:
        euler(gauss_denoiser, x, torch.tensor([1.0, 2.0, 0.0]))
    assert e.value.field == "sigmas"
    with pytest.raises(InvalidInput) as e:
        euler(gauss_denoiser, x.double(), SCHED.normal(3))
    assert e.value.field == "x"
    with pytest.raises(InvalidInput) as e:
        euler_ancestral(gauss_denoiser, x, SCHED.normal(3))  # no noise source
    assert e.value.field == "noise"
    # a repeated noise level is a no-op step, not a division by zero in DPM++ 2M
    once = dpmpp_2m(gauss_denoiser, x, torch.tensor([10.0, 2.0, 0.0]))
    twice = dpmpp_2m(gauss_denoiser, x, torch.tensor([10.0, 10.0, 2.0, 0.0]))
    assert torch.allclose(once, twice, rtol=1e-6)


def test_registry_lookup():
    assert get_sampler("Euler a").name == "euler_a"
    assert get_sampler("EULER_A").fn is euler_ancestral
    spec = get_sampler("dpm++ 2m karras")
    assert (spec.name, spec.fn, spec.schedule) == ("dpmpp_2m_karras", dpmpp_2m, "karras")
    assert get_sampler("DDIM").schedule == "ddim_uniform"
    assert get_sampler("dpmpp_2m").schedule == "normal"
    assert {s.label for s in SAMPLERS} >= {"Euler", "Euler a", "DPM++ 2M Karras", "DDIM"}
    with pytest.raises(InvalidInput) as e:
        get_sampler("heun")
    assert e.value.field == "sampler"
    assert "unknown sampler 'heun'" in e.value.message and "euler_a" in e.value.message


# -- EpsDenoiser ------------------------------------------------------------------------------
class LinearEps(torch.nn.Module):
    """eps = conv1x1(x) * (1 + t/1000) + mean(context): every input visibly matters."""

    def __init__(self, ctx_dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 1)
        self.proj = torch.nn.Linear(ctx_dim, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.calls = []

    def forward(self, x, timesteps, context):
        self.calls.append((x.shape[0], x.dtype, timesteps.clone(), context.dtype))
        c = self.proj(context.mean(1))[:, :, None, None]
        return self.conv(x) * (1 + timesteps / 1000)[:, None, None, None].to(x.dtype) + c


def test_eps_denoiser_math_and_cfg_batched_in_one_call():
    net = LinearEps()
    g = torch.Generator().manual_seed(5)
    cond, uncond = torch.randn((1, 3, 8), generator=g), torch.randn((1, 3, 8), generator=g)
    den = EpsDenoiser(net, SCHED, cond, uncond, cfg_scale=6.5)
    x = torch.randn((1, 4, 8, 8), generator=g)
    sigma = torch.tensor(2.5)
    out = den(x, sigma)
    assert len(net.calls) == 1 and net.calls[0][0] == 2  # cond + uncond in one call
    assert (den.unet_calls, den.samples) == (1, 2)
    t = SCHED.sigma_to_t(torch.tensor(2.5, dtype=torch.float64)).float()
    assert torch.allclose(net.calls[0][2], t.expand(2))
    with torch.no_grad():
        xin = x / math.sqrt(2.5**2 + 1)
        e_c = net(xin, t.expand(1), cond)
        e_u = net(xin, t.expand(1), uncond)
    want = x - 2.5 * (e_u + 6.5 * (e_c - e_u))
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-6)
    # cfg 1 skips the uncond half
    den1 = EpsDenoiser(net, SCHED, cond, uncond, cfg_scale=1.0)
    with torch.no_grad():
        assert torch.allclose(den1(x, sigma), x - 2.5 * e_c, rtol=1e-5, atol=1e-6)
    assert den1.samples == 1


def test_eps_denoiser_half_precision_unet_keeps_fp32_latents():
    net32 = LinearEps()
    net16 = LinearEps().to(torch.bfloat16)
    net16.load_state_dict({k: v.to(torch.bfloat16) for k, v in net32.state_dict().items()})
    g = torch.Generator().manual_seed(9)
    cond, uncond = torch.randn((1, 3, 8), generator=g), torch.randn((1, 3, 8), generator=g)
    sig = SCHED.karras(6)
    x = torch.randn((1, 4, 8, 8), generator=g) * sig[0]
    with torch.no_grad():
        ref = dpmpp_2m(EpsDenoiser(net32, SCHED, cond, uncond, 5.0), x, sig)
        den16 = EpsDenoiser(net16, SCHED, cond, uncond, 5.0, dtype=torch.bfloat16)
        out = dpmpp_2m(den16, x, sig)
    assert out.dtype == torch.float32
    assert all(c[1] == torch.bfloat16 and c[3] == torch.bfloat16 for c in net16.calls)
    assert all(c[2].dtype == torch.float32 for c in net16.calls)
    assert (out - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert den16.unet_calls == 6 and den16.samples == 12
