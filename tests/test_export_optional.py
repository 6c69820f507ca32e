"""Exported schedules in k-diffusion and diffusers, run only where those libraries are installed.

Neither is a dependency: these tests skip without them. They check the README's
snippets: `smap.sigmas(T)` (descending nu with a trailing 0) drives k-diffusion's
samplers as a tensor, and diffusers' `EulerDiscreteScheduler.set_timesteps(sigmas=...)`
takes it as it is (in float32).
"""
import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE = so.ve()
TARGET = models.Gaussian([0.3], [0.25])


def schedule_map():
    score = lambda x, t: TARGET.score(x, t, VE)
    return so.estimate_schedule_map(score, VE, TARGET.sample(2000, 0), 1, n_grid=200)


def test_k_diffusion_sample_euler_with_our_sigmas_is_our_euler_sampler_with_denoising():
    # sigmas of a T-step schedule are its T + 1 levels and a trailing 0: k-diffusion takes
    # T + 1 steps, the last from nu_min to 0 (x = D(x, nu_min)), which is our final
    # Tweedie denoising.
    torch = pytest.importorskip("torch")
    sampling = pytest.importorskip("k_diffusion.sampling")
    smap = schedule_map()
    ts, sigmas = smap.schedule(12), smap.sigmas(12)
    m, lam = float(TARGET.means[0, 0]), float(TARGET.var[0])
    denoiser = lambda x, sigma: m + lam * (x - m) / (lam + sigma[:, None] ** 2)   # D(x, sigma), s = 1 (VE)
    x_T = sm.prior_sample(VE, 64, TARGET.variance(), 0)
    theirs = sampling.sample_euler(denoiser, torch.as_tensor(x_T), torch.as_tensor(sigmas), disable=True).numpy()
    ours, _ = sm.sample(lambda x, t: TARGET.score(x, t, VE), VE, ts, x_T, 0, predictor="euler", denoise=True)
    # smap.sigmas reads nu off the stored grid: equal to the process's to the grid's resolution.
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-6)


def test_diffusers_takes_the_sigmas_with_their_trailing_zero():
    diffusers = pytest.importorskip("diffusers")
    smap = schedule_map()
    sigmas = smap.sigmas(10)                       # 11 levels and the trailing 0
    scheduler = diffusers.EulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=sigmas.tolist())
    assert len(scheduler.timesteps) == 11          # one per non-zero sigma: T + 1 steps
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas.astype(np.float32), rtol=1e-6)
