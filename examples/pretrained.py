"""Bring your own model: the schedule for your model, your sampler and n model calls, from its outputs.

A small MLP from `models.py` stands in for "your" network, trained (a few seconds) on the
mollified Cantor target as a discrete-time DDPM model on diffusers' "linear" beta table
(`process_from_alphas_cumprod`), and as a flow-matching model. Read top to bottom:

1. Wrap the model as a score: it is presented as your network would be, as an
   epsilon-prediction, a v-prediction and a k-diffusion/EDM denoiser (`score_from_eps`,
   `score_from_v`, `score_from_denoiser`), and as a flow velocity (`score_from_flow`).
2. The recommended call: `sampler.recommended_schedule(score, process, N_CALLS, x0, rng,
   step=SAMPLER)`, the schedule for N_CALLS model calls of that sampler: the equal local-error
   rule, diffusers' own spacings and the library's baselines, each run from the same prior
   draws and compared by the coupled error (the distance of the samples to the model's own
   fine solution from the same draws); the best, with the table.
3. The paper's corrector-optimised schedule map, on a budget of BUDGET per-sample
   evaluations, with error bars, saved as JSON and loaded back.
4. Export the recommended levels in each consumer's convention: diffusers'
   `DPMSolverMultistepScheduler.set_timesteps(**so.to_diffusers(...))` (the model's own
   integer timesteps), k-diffusion's sigmas (`so.to_sigmas`) and ComfyUI's `ManualSigmas`
   (`so.to_comfyui`); and the map's levels as flow-matching times.

    python examples/pretrained.py            # about 30 s on 2 cores
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

N_CALLS = 10                 # the model calls per sample you will spend
SAMPLER = "dpmpp_2m"         # the sampler you will use (diffusers' DPMSolverMultistepScheduler)
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

    # 2. The recommended schedule for this model, this sampler and N_CALLS model calls.
    start = time.perf_counter()
    best = sm.recommended_schedule(score, ddpm, N_CALLS, x0, args.seed + 2, step=SAMPLER)
    log(f"DDPM model on diffusers' linear table, {SAMPLER}, {N_CALLS} model calls: coupled error (mean squared "
        f"distance to the model's own solution from the same 32 draws), best first:")
    for name, error, stderr, vs_default, vs_baseline, kind in best.table[:6]:
        log(f"  {name:26s} {error:.3g} (paired s.e. to the best {stderr:.1g})  {vs_default:.2f}x your best default "
            f"({kind})")
    default = min((row for row in best.table if row[5] == "default"), key=lambda row: row[1])
    log(f"  ...\n  your best default: {default[0]} {default[1]:.3g}")
    log(f"  chosen: {best.name}; the rule took {best.rule.n_evaluations:,} per-sample evaluations, the check "
        f"{best.n_evaluations:,} more ({time.perf_counter() - start:.1f} s)")

    # 3. The paper's schedule map from each presentation, on a budget, saved and loaded.
    results = {"recommended": best}
    log("\n| model | presented as | Λ ± s.e. (grid error) | evaluations | nu levels for T = 10 |\n"
        "|---|---|---|---|---|")
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

    # 4. Export the recommended levels: N_CALLS model calls, then each consumer's own step to 0.
    flow_map = results["flow matching", "velocity u = eps - x0"]["map"]
    exports = {"diffusers": so.to_diffusers(ddpm, best.ts, "DPMSolverMultistepScheduler"),
               "k-diffusion": so.to_sigmas(ddpm, best.ts, dtype=np.float32), "comfyui": so.to_comfyui(ddpm, best.ts),
               "flow times": flow_map.flow_times(flow, N_CALLS)}
    log(f"\nExport, {N_CALLS} model calls:")
    log(f"  diffusers DPMSolverMultistepScheduler().set_timesteps(**so.to_diffusers(process, best.ts, ...))\n"
        f"    {exports['diffusers']}")
    log(f"  k-diffusion sample_dpmpp_2m(denoiser, x, torch.as_tensor(so.to_sigmas(process, best.ts, "
        f"dtype=np.float32)))\n    {np.array2string(exports['k-diffusion'], precision=4)}")
    log(f"  ComfyUI ManualSigmas: {exports['comfyui']}")
    log(f"  the flow model's map, FlowMatchEulerDiscreteScheduler().set_timesteps(sigmas=smap.flow_times(process, "
        f"{N_CALLS}).tolist())\n    {np.array2string(exports['flow times'], precision=4)}")
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
