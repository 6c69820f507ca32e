"""Diagnosis: where a trained model fails, per noise level, and where its stray samples come from.

The same MLP trained the same way under the two output parametrisations of `models.mlp_score`
(`preconditioning="eps"`, noise prediction, and `"edm"`, EDM's preconditioning), on the two
targets of the paper's experiments, with the budgets of this project's first examples:

- mollified Cantor, `vp_linear`, T = 20: 6,000 steps at lr 3e-3 on the schedule's levels, the
  schedule re-estimated from the model every 500 steps after 1,500 (Algorithm 2, dense grid);
- bimodal, `vp_linear`, T = 50: 4,000 steps, Algorithm 2's interval route.

For each model, on held-out data at levels uniform in log nu: the error of the denoised
estimate E|x0_hat - E[x0 | x]|^2 and of the scaled score E sigma^2 |S_theta - S|^2, against
the targets' exact scores (`sampler.score_error_by_level`); then 20,000 ancestral samples on
the model's own schedule, and, for the samples that end more than one data interval away,
the step at which they leave, their level, and the model's denoised estimate there against
the exact one.

    python examples/benchmarks/model_diagnosis.py            # about 3 minutes on 2 cores
    python examples/benchmarks/model_diagnosis.py --quick    # 200 training steps per model, 2,000 samples
"""
import argparse
import sys
import time

import numpy as np

import models
import sampler as sm
import scoreopt as so

N_SAMPLES = 20_000
CASES = {
    "cantor": dict(target=models.mollified_cantor, T=20, n_steps=6000, lr=3e-3, batch_size=256,
                   online=dict(every=500, burn_in=1500, gamma=0.5, route="grid", n_samples=4000)),
    "bimodal": dict(target=models.bimodal, T=50, n_steps=4000, lr=3e-3, batch_size=256,
                    online=dict(every=50, burn_in=1000, gamma=0.1, route="intervals")),
}
QUICK = dict(n_steps=200, n_samples=2000, online=dict(every=100, burn_in=100, n_samples=500, n_grid=50))


def quick_cases():
    """The same cases on a short budget (a smoke run): fewer steps and online samples, updates from step 100."""
    return {case: dict(cfg, n_steps=QUICK["n_steps"], online=dict(cfg["online"], **QUICK["online"]))
            for case, cfg in CASES.items()}


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: short trainings, fewer samples")
    args = parser.parse_args(argv)
    cases, n_samples = (quick_cases(), QUICK["n_samples"]) if args.quick else (CASES, N_SAMPLES)
    process, out = so.vp_linear(), {}
    levels = so.loglinear_schedule(process, 8)
    for case, cfg in cases.items():
        target = cfg["target"]()
        exact = lambda x, t: target.score(x, t, process)
        for preconditioning in ("eps", "edm"):
            start = time.perf_counter()
            run = models.train(models.init_mlp(0, width=64, depth=3), target, process,
                               so.uniform_schedule(process, cfg["T"]), rng=0, n_steps=cfg["n_steps"],
                               batch_size=cfg["batch_size"], lr=cfg["lr"], preconditioning=preconditioning,
                               online=models.OnlineSchedule(**cfg["online"]))
            model = run.score(process)
            errors = sm.score_error_by_level(model, exact, process, levels, target.sample(4000, 99), 100)
            stray = strays(model, exact, process, target, run.ts, n_samples)
            out[case, preconditioning] = {"errors": errors, "stray": stray, "seconds": time.perf_counter() - start}
            log(f"{case}, {preconditioning}: {stray['escaped']} of {n_samples:,} samples escaped, W1 {stray['w1']:.4g} "
                f"(trained in {out[case, preconditioning]['seconds']:.0f} s)")
    report(out, levels, process, log)
    return out


def strays(model, exact, process, target, ts, n_samples):
    """Ancestral samples on ``ts``; for those that end far from the data, the step they leave at."""
    x_T = sm.prior_sample(process, n_samples, target.variance(), 10)
    x = sm.sample(model, process, ts, x_T, 11, predictor="ancestral", max_growth=None).x
    lo, hi = target.interval if hasattr(target, "interval") else (-1.5, 1.5)
    far = (x[:, 0] < lo - (hi - lo)) | (x[:, 0] > hi + (hi - lo))
    result = {"escaped": int(far.sum()), "w1": sm.wasserstein1(x, target.cdf), "trace": []}
    if not far.any():
        return result
    y, rng, rows = x_T.copy(), np.random.default_rng(11), np.flatnonzero(far)
    for i, (t_cur, t_next) in enumerate(zip(ts[:0:-1], ts[-2::-1])):
        s, nu = process.s(t_cur), process.nsr(t_cur)
        denoised = lambda score: (y / s + nu ** 2 * s * score(y, t_cur))[rows, 0]
        result["trace"].append((i + 1, float(nu), float(process.nsr(t_next)), float(np.abs(y[rows]).max()),
                                denoised(model)[:4], denoised(exact)[:4]))
        y = sm.ancestral_step(model, process, y, t_cur, t_next, rng)[0]
    return result


def report(out, levels, process, log):
    nu = process.nsr(levels)
    for quantity, field in (("denoised estimate, E|x0_hat - E[x0|x]|^2", "denoiser_error"),
                            ("scaled score, E sigma^2 |S_theta - S|^2", "score_error")):
        log(f"\nError of the {quantity}, per noise level (held-out data):")
        log("| model | " + " | ".join(f"nu {v:.3g}" for v in nu) + " |")
        log("|---" * (len(nu) + 1) + "|")
        for (case, preconditioning), r in out.items():
            log(f"| {case}, {preconditioning} | " + " | ".join(f"{v:.2g}" for v in getattr(r["errors"], field)) + " |")
    for (case, preconditioning), r in out.items():
        if r["stray"]["trace"]:
            log(f"\n{case}, {preconditioning}: the escaped samples, step by step (the first four):")
            for step, nu_cur, nu_next, top, model_d, exact_d in r["stray"]["trace"][:3] + r["stray"]["trace"][-1:]:
                log(f"  step {step} (nu {nu_cur:.3g} -> {nu_next:.3g}): max |x| {top:.3g}; the model's denoised "
                    f"estimate {np.round(model_d, 2)}, the exact {np.round(exact_d, 2)}")


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for the script only (README)
    main(sys.argv[1:])
