"""Bring your own model: a schedule for any number of steps from a pre-trained model's outputs.

A small MLP from `models.py` stands in for "your" network. It is trained twice (a
few seconds each) on the mollified Cantor target:

1. as a discrete-time DDPM model on diffusers' "linear" beta table
   (`process_from_alphas_cumprod`), and then presented, as such models are, as an
   epsilon-prediction, a v-prediction and a k-diffusion/EDM denoiser;
2. as a flow-matching model (`flow_matching`: x_t = (1 - t) x_0 + t eps), presented as
   a velocity u = eps - x_0.

For each presentation: the adapter turns it into a score (`score_from_eps`,
`score_from_v`, `score_from_denoiser`, `score_from_flow`), the schedule map is
estimated on a budget of BUDGET per-sample evaluations, schedules for several T are
read off with error bars, the map is saved as JSON and loaded back, and the schedule
is exported: k-diffusion `sigmas`, diffusers `set_timesteps(sigmas=...)`, and the
model's own integer timesteps for the discrete-time model.

    python examples/pretrained.py            # about 11 s on 2 cores
    python examples/pretrained.py --quick    # about 5 s
"""
import argparse
import os
import sys
import time
import warnings

import numpy as np

import models
import scoreopt as so

BUDGET = 100_000
STEPS = (10, 20, 50)
TRAIN = dict(n_steps=3000, batch_size=256, lr=3e-3)
QUICK = dict(n_steps=800, budget=30_000)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "pretrained")


def diffusers_linear_alphas_cumprod(N=1000, beta_start=1e-4, beta_end=0.02):
    """diffusers' DDPMScheduler(beta_schedule="linear") table: cumprod(1 - linspace(beta_start, beta_end, N))."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, N))


def train(process, target, n_steps, seed):
    params = models.init_mlp(seed, dim=1, width=64, depth=3)
    return models.train(params, target, process, rng=seed, n_steps=n_steps, batch_size=TRAIN["batch_size"],
                        lr=TRAIN["lr"], levels="uniform", callback=None)


def presentations(state, process):
    """The trained model as the outputs a user's network would give, in each parametrisation."""
    S = state.score(process)
    eps = lambda x, t: -process.sigma(t) * S(x, t)                       # E[eps | x_t]
    x0_hat = lambda x, t: (x - process.sigma(t) * eps(x, t)) / process.s(t)
    if process.name.startswith("flow_matching"):
        return {"velocity u = eps - x0": (so.score_from_flow, lambda x, t: eps(x, t) - x0_hat(x, t))}

    def denoiser(y, nu):                                                    # EDM/k-diffusion: D(y, nu)
        t = float(so.time_from_nsr(process, np.array([nu]))[0])
        return x0_hat(process.s(t) * y, t)
    return {"epsilon-prediction": (so.score_from_eps, eps),
            "v-prediction": (so.score_from_v, lambda x, t: process.s(t) * eps(x, t) - process.sigma(t) * x0_hat(x, t)),
            "denoiser D(y, nu)": (so.score_from_denoiser, denoiser)}


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=OUT, help="folder for the saved schedule maps (JSON)")
    args = parser.parse_args(argv)
    n_steps, budget = (QUICK["n_steps"], QUICK["budget"]) if args.quick else (TRAIN["n_steps"], BUDGET)
    os.makedirs(args.out, exist_ok=True)
    begin = time.perf_counter()
    target = models.mollified_cantor()
    table = diffusers_linear_alphas_cumprod()
    processes = {"DDPM (diffusers linear betas)": so.process_from_alphas_cumprod(table),
                 "flow matching": so.flow_matching()}
    results = {}
    log("| model | presented as | Λ ± s.e. | evaluations | nu levels for T = 10 (± s.e. of the first interior one) |")
    log("|---|---|---|---|---|")
    for model_name, process in processes.items():
        state = train(process, target, n_steps, args.seed)
        x0 = target.sample(budget, args.seed + 1)                           # "your data"
        for kind, (adapter, outputs) in presentations(state, process).items():
            score = adapter(outputs, process)
            smap = so.estimate_schedule_map(score, process, x0, args.seed + 2, budget=budget, control_variate=True)
            path = os.path.join(args.out, f"{model_name.split()[0].lower()}_{kind.split()[0].lower()}.json")
            smap.save(path)
            loaded = so.load_schedule_map(path)
            nu = so.nsr(process, loaded.schedule(10))
            nu_se = np.abs(np.gradient(nu, loaded.schedule(10))) * loaded.schedule_stderr(10)
            results[model_name, kind] = {"map": loaded, "path": path, "sigmas": {T: loaded.sigmas(T + 1) for T in STEPS}}
            if process.n_timesteps:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    results[model_name, kind]["timesteps"] = {T: so.to_timesteps(process, loaded.schedule(T), merge=True)
                                                              for T in STEPS}
                results[model_name, kind]["merged"] = [str(w.message) for w in caught]
            log(f"| {model_name} | {kind} | {loaded.length:.3f} ± {loaded.length_stderr:.3f} | {loaded.n_evaluations:,} | "
                + ", ".join(f"{v:.3g}" for v in nu) + f" (± {nu_se[1]:.2g}) |")
    first = results[next(iter(results))]
    log("\nExport of the first map (T = 10):")
    log(f"  k-diffusion sigmas (pass torch.as_tensor(sigmas)): {np.array2string(first['sigmas'][10], precision=4)}")
    log("  diffusers: EulerDiscreteScheduler().set_timesteps(sigmas=sigmas.tolist())  (computes in float32)")
    log(f"  the model's own timesteps, descending (DDPMScheduler.set_timesteps(timesteps=...)): "
        f"{first['timesteps'][10].tolist()}")
    for T in STEPS:
        log(f"  T = {T}: {len(first['timesteps'][T]) - 1} distinct steps on the 1,000-entry table"
            + (" (levels closer than the table merged)" if len(first['timesteps'][T]) - 1 < T else ""))
    log(f"\nsaved: {', '.join(os.path.abspath(r['path']) for r in results.values())}")
    log(f"total time {time.perf_counter() - begin:.1f} s")
    return results


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for the script only (README)
    main(sys.argv[1:])
