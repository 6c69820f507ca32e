"""A float32 PyTorch model end to end: train it, find its schedule, sample with k-diffusion.

What a user with their own network does, timed. A PyTorch MLP denoiser in k-diffusion's
convention, `D(x, sigma)` in float32 with EDM's preconditioning, is trained on two moons
(2-D) under VE. Then, through `scoreopt.score_from_denoiser`:

1. the recommended call for 10 model calls of Euler, `sampler.recommended_schedule(...,
   step="euler")`: the equal local-error rule, checked against k-diffusion's own schedules
   (Karras, exponential) and the library's baselines with the model's own solution;
2. the paper's map on a budget, `estimate_schedule_map(..., budget=100_000, batch_size=1024)`;
3. k-diffusion's `sample_euler` on each, `to_sigmas(process, ts, dtype=np.float32)` and
   `smap.sigmas(n, dtype=np.float32)`, against `get_sigmas_karras(n)` (rho = 7, k-diffusion's
   default), all with the same n = 10 model calls, from the same float32 prior draw: coupled
   error against the model's own 200-step Heun solution (what a schedule controls) and sliced
   W1 to held-out data.

Needs PyTorch and k-diffusion (`pip install torch k-diffusion`; k-diffusion 0.1.1 also needs
`setuptools<81`); neither is a dependency of this package.

    python examples/torch_end_to_end.py            # about 15 s on 2 cores
    python examples/torch_end_to_end.py --quick    # a shorter training, fewer samples and a smaller budget
"""
import argparse
import sys
import time

import numpy as np

import sampler as sm
import scoreopt as so

try:
    import torch
    from k_diffusion import sampling
except ImportError as err:
    sys.exit(f"this example needs PyTorch and k-diffusion ({err}): pip install torch k-diffusion 'setuptools<81'")

SIGMA_DATA, N_TRAIN, N_STEPS, N_SAMPLES, N_CALLS = 0.5, 20_000, 3000, 4000, 10
BUDGET = 100_000                             # per-sample score evaluations for the paper's map
QUICK = dict(n_steps=500, n_samples=1000, budget=30_000)
PROCESS = so.ve()                            # k-diffusion's own convention: x = y, sigma = nu


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter training, fewer samples, a smaller budget")
    args = parser.parse_args(argv)
    n_steps, n_samples, budget = ((QUICK["n_steps"], QUICK["n_samples"], QUICK["budget"]) if args.quick
                                  else (N_STEPS, N_SAMPLES, BUDGET))
    torch.set_num_threads(2)
    data, held_out = moons(N_TRAIN, 0), moons(n_samples, 1)

    # 1. Your model: a float32 PyTorch denoiser, trained.
    start = time.perf_counter()
    model = train(data, n_steps)
    log(f"trained a float32 PyTorch denoiser ({n_steps} steps) in {time.perf_counter() - start:.1f} s")

    @torch.no_grad()
    def denoiser(y, nu):                       # what a user writes: NumPy in, NumPy out; the model stays float32
        y = torch.as_tensor(y, dtype=torch.float32)
        nu = torch.as_tensor(np.array(np.broadcast_to(nu, len(y))), dtype=torch.float32)
        return model(y, nu).double().numpy()

    # 2. Its schedules: the recommended call for N_CALLS Euler calls, and the paper's map on a budget.
    score = so.score_from_denoiser(denoiser, PROCESS)
    x0 = data[:5000].astype(np.float64)
    start = time.perf_counter()
    best = sm.recommended_schedule(score, PROCESS, N_CALLS, x0, 0, step="euler", batch_size=1024)
    log(f"recommended_schedule, {N_CALLS} Euler calls: {time.perf_counter() - start:.1f} s, chose {best.name!r}; "
        f"{best.rule.n_evaluations:,} per-sample evaluations for the rule and {best.n_evaluations:,} for the check")
    start = time.perf_counter()
    smap = so.estimate_schedule_map(score, PROCESS, x0, 0, budget=budget, batch_size=1024)
    log(f"estimate_schedule_map, budget {budget:,}: {time.perf_counter() - start:.1f} s, "
        f"{smap.n_evaluations:,} evaluations, Λ = {smap.length:.3f} ± {smap.length_stderr:.3f} "
        f"(grid error {smap.grid_error:.3f})")

    # 3. Sampling with k-diffusion on each schedule, against its default (Karras, rho = 7).
    sigma_min, sigma_max = float(PROCESS.nsr(PROCESS.t_min)), float(PROCESS.nsr(PROCESS.t_max))
    float32 = lambda ts: torch.as_tensor(so.to_sigmas(PROCESS, ts, dtype=np.float32))
    schedules = {
        f"k-diffusion get_sigmas_karras({N_CALLS}) (rho = 7)": sampling.get_sigmas_karras(N_CALLS, sigma_min,
                                                                                          sigma_max),
        f"recommended ({best.name}), to_sigmas(process, best.ts)": float32(best.ts),
        "the rule alone, to_sigmas(process, best.rule.ts)": float32(best.rule.ts),
        f"corrector map, smap.sigmas({N_CALLS}, float32)": torch.as_tensor(smap.sigmas(N_CALLS, dtype=np.float32)),
    }
    x_T = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(2)) * sigma_max
    fine = sampling.sample_heun(model, x_T, sampling.get_sigmas_karras(200, sigma_min, sigma_max), disable=True)
    log(f"\nk-diffusion sample_euler, {N_CALLS} model calls each, {n_samples} samples from one float32 prior draw:")
    log("| schedule | dtype out | coupled error to the model's 200-step solution | sliced W1 to held-out data |")
    log("|---|---|---|---|")
    results = {}
    with torch.no_grad():
        for name, sigmas in schedules.items():
            assert len(sigmas) == N_CALLS + 1, (name, len(sigmas))       # N_CALLS levels, then the 0
            start = time.perf_counter()
            x = sampling.sample_euler(model, x_T, sigmas.to(torch.float32), disable=True)
            coupled = float(((x - fine) ** 2).mean())
            w1 = sm.sliced_wasserstein(x.double().numpy(), held_out.astype(np.float64), 0)
            results[name] = dict(coupled=coupled, w1=w1, dtype=str(x.dtype), seconds=time.perf_counter() - start)
            log(f"| {name} | {x.dtype} | {coupled:.3g} | {w1:.4f} |")
    floor = sm.sliced_wasserstein(data[:n_samples].astype(np.float64), held_out.astype(np.float64), 0)
    log(f"noise floor (training against held-out data, {n_samples} each): sliced W1 {floor:.4f}")
    return results


# --------------------------------------------------------------------------------
# The data and the model
# --------------------------------------------------------------------------------

def moons(n, rng):
    """Two interleaved half circles, scaled to a standard deviation of about 0.5."""
    rng = np.random.default_rng(rng)
    angle, upper = rng.uniform(0, np.pi, n), rng.integers(0, 2, n).astype(bool)
    x = np.where(upper[:, None], np.c_[np.cos(angle), np.sin(angle)], np.c_[1 - np.cos(angle), 0.5 - np.sin(angle)])
    return ((x - [0.5, 0.25]) * 0.5 + 0.03 * rng.standard_normal((n, 2))).astype(np.float32)


class Denoiser(torch.nn.Module):
    """EDM's preconditioning around a small MLP: D = c_skip x + c_out F(c_in x, log(sigma)/4)."""

    def __init__(self, width=128):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.SiLU(), torch.nn.Linear(width, width),
                                       torch.nn.SiLU(), torch.nn.Linear(width, 2))

    def forward(self, x, sigma):
        sigma = sigma.reshape(-1, 1).to(x.dtype)
        c_skip = SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
        c_out = sigma * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
        return c_skip * x + c_out * self.net(torch.cat([c_in * x, sigma.log() / 4], dim=1))


def train(data, n_steps):
    torch.manual_seed(0)
    model, data = Denoiser(), torch.from_numpy(data)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(n_steps):
        x0 = data[torch.randint(0, len(data), (512,))]
        sigma = (torch.randn(512) * 1.2 - 1.2).exp()
        weight = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        loss = (weight[:, None] * (model(x0 + sigma[:, None] * torch.randn_like(x0), sigma) - x0) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


if __name__ == "__main__":
    main(sys.argv[1:])
