"""Why the equal local-error rule lost on a DDPM epsilon-model: the measurements behind
docs/derivations.md, section 12. Writes docs/reports/calls_diagnosis.md.

On the DDPM epsilon-model of calls_benchmark.py (trained as diffusers' docs train one, cached by
that script), from the model's own fine solution:

1. The propagation weight. An Euler step of ratio 1.8 in nu is taken from rows on the model's
   flow at several levels; its local error d (against 8 Heun substeps) is carried to sigma = 0
   by the model's flow, and |carried d|^2 is set against the rule's Gaussian weight of d
   (sampler.flow_weight) and against the measured correction (sampler._measured_gain).
2. Additivity. Along a schedule of n calls, each DPM-Solver++(2M) or Euler step's local error,
   from the sampler's own state and carry, is carried to sigma = 0 by the model's flow; their sum
   is set against the coupled error of the whole run (the two are equal when errors add up).
3. The rule against the library's baselines at n = 4..10 calls, with the Gaussian and the
   measured gain (coupled error on 128 shared draws).

    python examples/benchmarks/calls_diagnosis.py            # about 5 minutes on 2 cores
    python examples/benchmarks/calls_diagnosis.py --bare     # the plain MLP (no skip), as a user first trains it
    python examples/benchmarks/calls_diagnosis.py --quick    # a smoke run on the --quick model
"""
import argparse
import os
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import torch
    import calls_benchmark as cb
except Exception as err:          # ImportError, or the benchmark's own message (SystemExit)
    sys.exit(f"this diagnosis needs calls_benchmark.py and its packages, torch and diffusers "
             f"({type(err).__name__}: {err}): pip install torch diffusers")

import sampler as sm
import scoreopt as so

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
REPORT = os.path.join(ROOT, "docs", "reports", "calls_diagnosis.md")
LEVELS_NU = (120.0, 50.0, 20.0, 8.0, 3.0, 1.0, 0.3)
CALLS = (4, 6, 8, 10)
M = 128                                  # shared prior draws
REFERENCE = 200                          # the model's own solution: log-linear Heun steps, then D at t_min


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the --quick model, fewer draws; no report written")
    parser.add_argument("--cache", default=cb.CACHE, help="calls_benchmark.py's model cache")
    parser.add_argument("--bare", action="store_true",
                        help="the plain MLP epsilon-model (ddpm_bare.pt in the cache: calls_benchmark's first, "
                             "without the skip through the table); writes calls_diagnosis_bare.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)
    begin = time.perf_counter()
    ctx = cb.load_ddpm(args.cache, quick=args.quick)
    if args.bare:
        ctx = bare_model(ctx, args.cache)
    process, score, x0 = ctx.process, ctx.score, ctx.train[:2000].astype(np.float64)
    m, calls = (32, (4, 6)) if args.quick else (M, CALLS)
    x_T = sm.prior_sample(process, m, x0.var(axis=0), 5)
    fine = so.loglinear_schedule(process, REFERENCE)
    command = "python examples/benchmarks/calls_diagnosis.py" + " --bare" * args.bare
    lines = [f"# Why the rule lost on a DDPM epsilon-model (`{command}`)", "",
             f"Model: calls_benchmark.py's DDPM {'plain MLP' if args.bare else 'epsilon-net'} "
             f"({ctx.info.get('parameters', '?')} parameters), "
             f"{m} shared prior draws, its own solution by {REFERENCE} log-linear Heun steps.", ""]
    lines += weight_table(score, process, x0, x_T, fine)
    lines += additivity_table(score, process, x0, x_T, fine)
    lines += rule_table(score, process, x0, x_T, fine, calls)
    lines += ["", f"Run time {time.perf_counter() - begin:.0f} s on {os.cpu_count()} cores."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        with open(REPORT.replace(".md", "_bare.md") if args.bare else REPORT, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {REPORT.replace('.md', '_bare.md') if args.bare else REPORT}")


def bare_model(ctx, cache):
    """The DDPM context with calls_benchmark's first epsilon-model: a plain MLP eps(x, k), no skip."""
    saved = torch.load(os.path.join(cache, "ddpm_bare.pt"), map_location="cpu", weights_only=False)
    net = cb.MLP(ctx.train.shape[1], **cb.MLP_SIZE)
    net.load_state_dict(saved["ema"])
    eps_model = cb.numpy_model(net.eval(), lambda t: t * (cb.N_TRAIN_TIMESTEPS - 1))
    return SimpleNamespace(**dict(vars(ctx), net=net, info=saved["info"], eps_model=eps_model,
                                  score=so.score_from_eps(eps_model, ctx.process)))


def heun_path(score, process, x, ts_desc):
    for a, b in zip(ts_desc[:-1], ts_desc[1:]):
        x = sm.heun_step(score, process, x, a, b, None)[0]
    return x


def to_zero(score, process, fine, x, t):
    """The model's own flow from t to sigma = 0: Heun on the fine levels below t, then D at t_min."""
    return sm.tweedie_denoise(score, process, heun_path(score, process, x, np.concatenate([[t], fine[fine < t][::-1]])),
                              process.t_min)


def weight_table(score, process, x0, x_T, fine):
    weight = sm.flow_weight(x0)
    correction = sm._measured_gain(so.guest_score(score, process=process), process, x0[:32],
                                   np.random.default_rng(0), weight)
    out = ["## 1. An error carried by the model's flow against the Gaussian weight", "",
           "| nu | carried / Gaussian weight | measured correction (the rule's) |", "|---|---|---|"]
    for nu in LEVELS_NU:
        t, t2 = (float(v) for v in so.time_from_nsr(process, np.array([nu, nu / 1.8])))
        x = heun_path(score, process, x_T, np.concatenate([fine[fine >= t][::-1], [t]]))
        coarse = sm.euler_step(score, process, x, t, t2, None)[0]
        exact = heun_path(score, process, x, np.linspace(t, t2, 9))
        d = coarse - exact
        gaussian = np.mean(sm._weighted_error(weight, process, d, np.full(len(d), t2))) * d.shape[1]
        carried = np.mean(np.sum((to_zero(score, process, fine, coarse, t2)
                                  - to_zero(score, process, fine, exact, t2)) ** 2, axis=1))
        out.append(f"| {nu:g} | {carried / gaussian:.2f} | {float(correction(np.array([t2]))[0]):.2f} |")
    return out + [""]


def additivity_table(score, process, x0, x_T, fine, n=10):
    out = ["## 2. Do the local errors add up?", "",
           f"n = {n} calls; each step's local error, from the sampler's own state, carried to sigma = 0.", "",
           "| sampler | schedule | sum of carried local errors | coupled error of the run |", "|---|---|---|---|"]
    reference = to_zero(score, process, fine, x_T, process.t_max)
    for step in ("euler", "dpmpp_2m"):
        for name in ("loglinear", "edm3"):
            ts = so.baseline_schedules(process, n, 0.5)[name][1:]
            desc, x, carry, total = ts[::-1], x_T, None, 0.0
            for a, b in zip(desc[:-1], desc[1:]):
                if step == "dpmpp_2m":
                    y, _, carry_next = sm.dpmpp_2m_step(score, process, x, a, b, None, carry)
                else:
                    y, carry_next = sm.euler_step(score, process, x, a, b, None)[0], None
                exact = heun_path(score, process, x, np.linspace(a, b, 9))
                total += np.mean((to_zero(score, process, fine, y, b) - to_zero(score, process, fine, exact, b)) ** 2)
                x, carry = y, carry_next
            y = sm.tweedie_denoise(score, process, x, desc[-1])
            total += np.mean((y - to_zero(score, process, fine, x, desc[-1])) ** 2)
            out.append(f"| {step} | {name} | {total:.4g} | {np.mean((y - reference) ** 2):.4g} |")
    return out + [""]


def rule_table(score, process, x0, x_T, fine, calls):
    reference = to_zero(score, process, fine, x_T, process.t_max)
    error = lambda ts, step: float(np.mean((sm.sample_calls(score, process, ts, x_T, 0, step=step).x - reference) ** 2))
    out = ["## 3. The rule against the best library baseline (coupled error, ratio)", "",
           "| sampler | n | best baseline | rule, Gaussian gain | rule, measured gain |", "|---|---|---|---|---|"]
    for step in ("euler", "dpmpp_2m"):
        for n in calls:
            base = {k: error(v[1:], step) for k, v in so.baseline_schedules(process, n, float(x0.std())).items()}
            best = min(base, key=base.get)
            rule = [error(sm.equal_error_calls(score, process, n, x0, 0, step=step, gain=g).ts, step) / base[best]
                    for g in ("gaussian", "measured")]
            out.append(f"| {step} | {n} | {best} {base[best]:.4g} | {rule[0]:.2f} | {rule[1]:.2f} |")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
