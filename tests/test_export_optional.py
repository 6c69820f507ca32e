"""The exports and the scaling recipes against the installed libraries themselves.

None of these libraries is a dependency: each test skips, saying what is missing, where its
library is not installed (torch with k-diffusion, which needs ``setuptools<81`` for
``pkg_resources``; diffusers; dask with distributed). They check the README's recipes:
``smap.sigmas(n)`` is exactly k-diffusion's convention (n levels and a 0, n model calls),
a float32 model runs end to end with ``dtype=np.float32``, DPM-Solver++(2M) is
k-diffusion's, diffusers' schedulers take the exports, and Dask's maps give the serial
result.
"""
import importlib

import numpy as np
import pytest

import models
import sampler as sm
import scoreopt as so

VE = so.ve()
TARGET = models.Gaussian([0.3], [0.25])
M, LAM = 0.3, 0.25


def needs(module, why):
    try:
        return importlib.import_module(module)
    except Exception as err:            # ImportError, or pkg_resources missing inside k-diffusion
        pytest.skip(f"{why}: could not import {module!r} ({type(err).__name__}: {err})")


def schedule_map(process=VE):
    score = lambda x, t: TARGET.score(x, t, process)
    return so.estimate_schedule_map(score, process, TARGET.sample(2000, 0), 1, n_grid=200)


def test_k_diffusion_sigmas_convention_and_sample_euler_are_ours():
    # get_sigmas_karras(n) has n levels and a 0; so has smap.sigmas(n). sample_euler on them
    # takes n steps, the last from nu_min to 0: our (n - 1)-step schedule and the final denoising.
    torch = needs("torch", "PyTorch is not installed")
    sampling = needs("k_diffusion.sampling", "k-diffusion is not installed (it needs setuptools<81)")
    smap = schedule_map()
    for n in (5, 13):
        assert sampling.get_sigmas_karras(n, 0.002, 80.0).shape == smap.sigmas(n).shape == (n + 1,)
    denoiser = lambda x, sigma: M + LAM * (x - M) / (LAM + sigma[:, None] ** 2)
    x_T = sm.prior_sample(VE, 64, TARGET.variance(), 0)
    theirs = sampling.sample_euler(denoiser, torch.as_tensor(x_T), torch.as_tensor(smap.sigmas(13)), disable=True)
    ours = sm.sample(lambda x, t: TARGET.score(x, t, VE), VE, smap.schedule(12), x_T, 0, predictor="euler",
                     denoise=True)
    assert ours.nfe == 13
    # smap.sigmas reads nu off the stored grid: equal to the process's to the grid's resolution.
    np.testing.assert_allclose(theirs.numpy(), ours.x, rtol=1e-4, atol=1e-6)


def test_a_float32_model_runs_end_to_end_with_float32_sigmas():
    torch = needs("torch", "PyTorch is not installed")
    sampling = needs("k_diffusion.sampling", "k-diffusion is not installed (it needs setuptools<81)")
    net = torch.nn.Linear(1, 1).float()
    with torch.no_grad():
        net.weight.fill_(0.0), net.bias.fill_(M)

    def denoiser(x, sigma):                       # a float32 model: refuses float64 input
        c_skip = (LAM / (LAM + sigma ** 2))[:, None]
        return c_skip * x + (1 - c_skip) * net(x)
    smap = schedule_map()
    x_T = torch.as_tensor(sm.prior_sample(VE, 16, TARGET.variance(), 0), dtype=torch.float32)
    out = sampling.sample_euler(denoiser, x_T, torch.as_tensor(smap.sigmas(10, dtype=np.float32)), disable=True)
    assert out.dtype == torch.float32 and torch.all(torch.isfinite(out))
    with pytest.raises(RuntimeError):             # float64 sigmas turn the samples into float64
        sampling.sample_euler(denoiser, x_T, torch.as_tensor(smap.sigmas(10)), disable=True)


def test_dpmpp_2m_is_k_diffusions():
    torch = needs("torch", "PyTorch is not installed")
    sampling = needs("k_diffusion.sampling", "k-diffusion is not installed (it needs setuptools<81)")
    smap = schedule_map()
    denoiser = lambda x, sigma: M + LAM * (x - M) / (LAM + sigma[:, None] ** 2)
    x_T = sm.prior_sample(VE, 32, TARGET.variance(), 0)
    ts = smap.schedule(11)
    theirs = sampling.sample_dpmpp_2m(denoiser, torch.as_tensor(x_T), torch.as_tensor(so.to_sigmas(VE, ts)),
                                      disable=True)
    ours = sm.sample(lambda x, t: TARGET.score(x, t, VE), VE, ts, x_T, 0, predictor="dpmpp_2m", denoise=True)
    np.testing.assert_allclose(theirs.numpy(), ours.x, rtol=1e-9, atol=1e-12)


def test_diffusers_schedulers_take_the_exports():
    diffusers = needs("diffusers", "diffusers is not installed")
    smap = schedule_map()
    euler = diffusers.EulerDiscreteScheduler()
    euler.set_timesteps(sigmas=smap.sigmas(10).tolist())       # 10 levels and the 0: 10 model calls
    assert len(euler.timesteps) == 10
    np.testing.assert_allclose(euler.sigmas.numpy(), smap.sigmas(10).astype(np.float32), rtol=1e-6)
    table = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    ddpm_process = so.process_from_alphas_cumprod(table)
    ddpm_map = schedule_map(ddpm_process)
    ddpm = diffusers.DDPMScheduler()
    ddpm.set_timesteps(timesteps=ddpm_map.timesteps(ddpm_process, 10).tolist())
    assert list(ddpm.timesteps.numpy()) == list(ddpm_map.timesteps(ddpm_process, 10))
    flow = so.flow_matching()
    flow_map = schedule_map(flow)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()     # shift=1.0 (the default): times as given
    scheduler.set_timesteps(sigmas=flow_map.flow_times(flow, 10).tolist())
    got = scheduler.sigmas.numpy()
    assert got[0] == 1.0 and got[-1] == 0.0 and len(scheduler.timesteps) == 10
    np.testing.assert_allclose(got[:-1], flow_map.flow_times(flow, 10), rtol=1e-6)


CANTOR = models.mollified_cantor()
VP = so.vp_linear()


def cantor_score(x, t):
    return CANTOR.score(x, t, VP)


@pytest.fixture(scope="module")
def dask_client():
    distributed = needs("distributed", "dask.distributed is not installed")
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_dask_maps_give_the_serial_result(dask_client):
    x0 = CANTOR.sample(300, 0)
    serial = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=24)
    executor = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=24,
                                        workers=dask_client.get_executor().map)
    gathered = so.estimate_schedule_map(cantor_score, VP, x0, 3, n_grid=24,
                                        workers=lambda f, xs: dask_client.gather(dask_client.map(f, xs, pure=False)))
    for result in (executor, gathered):
        np.testing.assert_array_equal(result.Lambda, serial.Lambda)
        assert result.n_evaluations == serial.n_evaluations
