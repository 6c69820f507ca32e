"""Bring your own model: the schedule for your model, your sampler and T steps, from its outputs.

A small MLP from `models.py` stands in for "your" network, trained (a few seconds) on the
mollified Cantor target as a discrete-time DDPM model on diffusers' "linear" beta table
(`process_from_alphas_cumprod`), and as a flow-matching model. Read top to bottom:

1. Wrap the model as a score: it is presented as your network would be, as an
   epsilon-prediction, a v-prediction and a k-diffusion/EDM denoiser (`score_from_eps`,
   `score_from_v`, `score_from_denoiser`), and as a flow velocity (`score_from_flow`).
2. The recommended call: `sampler.equal_error_schedule(score, process, T, x0, rng,
   step="heun")`, the schedule whose steps make equal local error against the model's own
   flow, for that sampler and T. It is compared with the baselines by the coupled error: the
   distance of T-step samples to the model's own 200-step solution from the same draws.
3. The paper's corrector-optimised schedule map, on a budget of BUDGET per-sample
   evaluations, with error bars, saved as JSON and loaded back.
4. Export in each library's convention: k-diffusion's `sigmas(n)` (n levels and a 0: n
   model calls with Euler), diffusers' `set_timesteps(sigmas=...)`, the model's own
   integer timesteps (`DDPMScheduler.set_timesteps(timesteps=...)`), and flow-matching
   times from t = 1 (`FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)`).

    python examples/pretrained.py            # about 40 s on 2 cores
    python examples/pretrained.py --quick    # about 15 s
"""
import argparse
import os
import sys
import time

import numpy as np

import models
import sampler as sm
import scoreopt as so

T = 10                       # the steps you will sample with
SAMPLER = "heun"             # the sampler you will use
BUDGET = 100_000             # per-sample score evaluations for the paper's map
TRAIN = dict(n_steps=3000, batch_size=256, lr=3e-3)
QUICK = dict(n_steps=800, budget=30_000)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "pretrained")


def main(argv=None, log=print):
    args = settings(argv)
    n_steps, budget = (QUICK["n_steps"], QUICK["budget"]) if args.quick else (TRAIN["n_steps"], BUDGET)
    os.makedirs(args.out, exist_ok=True)
    begin = time.perf_counter()
    target = models.mollified_cantor()
    x0 = target.sample(budget, args.seed + 1)                              # "your data"
    ddpm = so.process_from_alphas_cumprod(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))   # diffusers' linear
    flow = so.flow_matching()

    # 1. Your model, as a score: the same network seen through each adapter.
    network = stand_in_model(ddpm, target, n_steps, args.seed)
    scores = {kind: adapter(output, ddpm) for kind, (adapter, output) in presentations(network, ddpm).items()}
    score = scores["epsilon-prediction"]

    # 2. The recommended schedule for this model, sampler and T.
    found = sm.equal_error_schedule(score, ddpm, T, x0, args.seed + 2, step=SAMPLER)
    x_T = sm.prior_sample(ddpm, 2000, x0.var(axis=0), args.seed + 3)
    reference = sm.sample(score, ddpm, so.loglinear_schedule(ddpm, 200), x_T, 0, predictor="heun").x
    candidates = dict(so.baseline_schedules(ddpm, T, float(x0.std())), **{"equal local error": found.ts})
    coupled = {name: sm.coupled_error(score, ddpm, ts, x_T, reference, step=SAMPLER) for name, ts in candidates.items()}
    log(f"DDPM model on diffusers' linear table, {SAMPLER}, T = {T}: coupled error (mean squared distance to the "
        f"model's own 200-step solution from the same 2,000 draws):")
    for name, value in sorted(coupled.items(), key=lambda kv: kv[1]):
        log(f"  {name:18s} {value:.3g}")
    log(f"  equal_error_schedule: {found.n_iter} updates, {'converged' if found.converged else 'not converged'}, "
        f"{found.n_evaluations:,} per-sample evaluations")

    # 3. The paper's schedule map from each presentation, on a budget, saved and loaded.
    results = {"coupled": coupled, "equal_error": found}
    log("\n| model | presented as | Λ ± s.e. (grid error) | evaluations | nu levels for T = 10 |\n|---|---|---|---|---|")
    flow_network = stand_in_model(flow, target, n_steps, args.seed)
    for model_name, process, kinds in (("DDPM", ddpm, scores),
                                       ("flow matching", flow, {"velocity u = eps - x0": so.score_from_flow(
                                           presentations(flow_network, flow)["velocity u = eps - x0"][1], flow)})):
        for kind, kind_score in kinds.items():
            smap = so.estimate_schedule_map(kind_score, process, x0, args.seed + 2, budget=budget)
            path = os.path.join(args.out, f"{model_name.split()[0].lower()}_{kind.split()[0].lower()}.json")
            smap.save(path)
            loaded = so.load_schedule_map(path)
            results[model_name, kind] = {"map": loaded, "path": path, "process": process}
            log(f"| {model_name} | {kind} | {loaded.length:.3f} ± {loaded.length_stderr:.3f} ({loaded.grid_error:.2g}) | "
                f"{loaded.n_evaluations:,} | " + ", ".join(f"{v:.3g}" for v in so.nsr(process, loaded.schedule(10))) + " |")

    # 4. Export: n levels = n model calls with Euler; the (n - 1)-step schedule, then the final denoising.
    ddpm_map, flow_map = results["DDPM", "epsilon-prediction"]["map"], results["flow matching", "velocity u = eps - x0"]["map"]
    exports = {"k-diffusion sigmas(11)": ddpm_map.sigmas(11, dtype=np.float32),
               "DDPM timesteps(11)": ddpm_map.timesteps(ddpm, 11),
               "flow times(11)": flow_map.flow_times(flow, 11)}
    log("\nExport, 11 levels (the 10-step schedule, then the final step to 0: 11 model calls with Euler):")
    log(f"  k-diffusion: sample_euler(denoiser, x, torch.as_tensor(smap.sigmas(11, dtype=np.float32)))\n"
        f"    {np.array2string(exports['k-diffusion sigmas(11)'], precision=4)}")
    log("  diffusers EulerDiscreteScheduler().set_timesteps(sigmas=smap.sigmas(11).tolist())")
    log(f"  diffusers DDPMScheduler().set_timesteps(timesteps=smap.timesteps(process, 11).tolist())\n"
        f"    {exports['DDPM timesteps(11)'].tolist()}")
    log(f"  diffusers FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=smap.flow_times(process, 11).tolist())\n"
        f"    {np.array2string(exports['flow times(11)'], precision=4)}")
    log(f"\nsaved: {', '.join(os.path.abspath(r['path']) for k, r in results.items() if isinstance(k, tuple))}")
    log(f"total time {time.perf_counter() - begin:.1f} s")
    return dict(results, exports=exports)


# --------------------------------------------------------------------------------
# The stand-in for your network
# --------------------------------------------------------------------------------

def settings(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a shorter run")
    parser.add_argument("--out", default=OUT, help="folder for the saved schedule maps (JSON)")
    return parser.parse_args(argv)


def stand_in_model(process, target, n_steps, seed):
    params = models.init_mlp(seed, dim=1, width=64, depth=3)
    return models.train(params, target, process, so.loglinear_schedule(process, 64), rng=seed, n_steps=n_steps,
                        batch_size=TRAIN["batch_size"], lr=TRAIN["lr"], levels="between").score(process)


def presentations(score, process):
    """A model as the outputs a user's network would give, in each parametrisation; ``t`` may
    be one time per row, as the adapters pass it."""
    col = lambda a: np.reshape(a, (-1, 1)) if np.ndim(a) else a
    eps = lambda x, t: -col(process.sigma(t)) * score(x, t)                  # E[eps | x_t]
    x0_hat = lambda x, t: (x - col(process.sigma(t)) * eps(x, t)) / col(process.s(t))
    if process.name.startswith("flow_matching"):
        return {"velocity u = eps - x0": (so.score_from_flow, lambda x, t: eps(x, t) - x0_hat(x, t))}

    def denoiser(y, nu):                                                    # EDM/k-diffusion: D(y, nu)
        t = so.time_from_nsr(process, np.atleast_1d(nu))
        t = t if np.ndim(nu) else float(t[0])
        return x0_hat(col(process.s(t)) * y, t)
    return {"epsilon-prediction": (so.score_from_eps, eps),
            "v-prediction": (so.score_from_v, lambda x, t: col(process.s(t)) * eps(x, t)
                             - col(process.sigma(t)) * x0_hat(x, t)),
            "denoiser D(y, nu)": (so.score_from_denoiser, denoiser)}


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for the script only (README)
    main(sys.argv[1:])
