"""Quality per step: baseline schedules against score-optimised ones (the paper's Tables 2-3 in spirit).

For each target (Gaussian d = 1, Gaussian d = 64 with a power-law spectrum, bimodal,
mollified Cantor), process (vp_linear, ve), sampler and number of steps T, the
quality of every baseline schedule and of the corrector- and predictor-optimised
schedules, all with the targets' exact scores:

- Gaussian targets: the exact KL(sampler output || p_{t_min}) from
  `sampler.gaussian_output_law` (no Monte-Carlo error);
- mixtures: W1 against the exact CDF of p_{t_min} and the number of modes holding a
  fair share, from N_SAMPLES samples (common random numbers across schedules).

Quality is measured against p_{t_min}, the law every sampler here targets (no final
denoising), so the floor set by sigma(t_min) is not counted against any schedule.

The corrector-optimised schedule comes from one dense-grid schedule map per target
and process (re-discretised to every T); the predictor-optimised one from the damped
fixed-point iteration per T (Monte-Carlo L_p through autograd; for the 64-d Gaussian
the closed-form L_p, since the exact Jacobian would need 64 nested reverse passes).

Sampler-aware rows (derived: docs/derivations.md, sections 7-9), for euler, heun, ancestral
and dpmpp_2m at T <= 50: the equal local-error schedule of that sampler
(`sampler.equal_error_schedule`, from the exact score: KL weight for Gaussians, data weight
for mixtures, 32 points), the equal step-cost schedule (`equal_cost_schedule(cost=
retired.step_cost)`, N_STEP_COST samples; not for the multistep dpmpp_2m) and, for Gaussian
targets, the KL-optimal limit (`sampler.gaussian_optimal_schedule`), against which every
schedule's KL is reported as a ratio (degenerate, and so left out of the summary, for
dpmpp_2m in 1-D: docs/derivations.md section 7).

The step cost of the Stein identity and the closed-form predictor cost left the library; they
live beside this script, in `retired.py` (docs/derivations.md has their measurements).

    python examples/benchmarks/benchmark.py            # full run, writes docs/reports/benchmark.md
    python examples/benchmarks/benchmark.py --quick    # a smoke run (two targets, vp_linear, two samplers), prints only
"""
import argparse
import os
import sys
import time

import numpy as np

import models
import sampler as sm
import scoreopt as so

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))      # retired.py, beside this script
import retired  # noqa: E402

STEPS = (5, 10, 20, 50, 100)
SAMPLERS = {"euler": ("euler", 0), "heun": ("heun", 0), "ancestral": ("ancestral", 0),
            "euler_maruyama": ("euler_maruyama", 0), "dpmpp_2m": ("dpmpp_2m", 0),
            "langevin": ("none", 1)}          # annealed Langevin: one corrector step per level
CORRECTOR_RATIO = 0.1
N_SAMPLES = 20_000       # samples per quality estimate (mixtures)
N_COST = 2_000           # data samples behind the corrector map (a quarter for the predictor iteration)
N_GRID = 1_000           # grid of the corrector schedule map
AWARE_SAMPLERS = ("euler", "heun", "ancestral", "dpmpp_2m")   # samplers with sampler-aware rows and a limit
AWARE_STEPS = (5, 10, 20, 50)
N_STEP_COST = 4_000      # data samples behind the step-cost fixed point
SEED = 0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "reports", "benchmark.md")


def make_targets():
    spectrum = np.arange(1, 65, dtype=float) ** -1.0       # lambda_k = k^-1
    return {"gaussian-1d": models.Gaussian([0.0], [0.25]),
            "gaussian-64d": models.Gaussian(np.zeros(64), spectrum),
            "bimodal": models.bimodal(),
            "cantor": models.mollified_cantor()}


class Counter:
    """Wraps a score and counts batch calls and per-sample evaluations."""

    def __init__(self, score):
        self.score, self.calls, self.evaluations = score, 0, 0

    def __call__(self, x, t):
        self.calls += 1
        self.evaluations += len(x)
        return self.score(x, t)


def corrector_map(target, process):
    """Dense-grid schedule map from score evaluations; returns the map and its cost."""
    score = Counter(lambda x, t: target.score(x, t, process))
    start = time.perf_counter()
    smap = so.estimate_schedule_map(score, process, target.sample(N_COST, SEED), SEED + 1, n_grid=N_GRID)
    return smap, {"calls": score.calls, "evaluations": score.evaluations,
                  "seconds": time.perf_counter() - start}


def predictor_schedule(target, process, T, start_ts):
    """Equal-L_p schedule by the fixed-point iteration; returns it and its cost."""
    begin = time.perf_counter()
    if target.dim > 1:
        costs = lambda ts: retired.gaussian_predictor_cost(process, ts[1:], ts[:-1], target.var, target.means[0])
        res = so.iterate_schedule(costs, start_ts, gamma=0.5, order=4, max_iter=100, tol=1e-3)
        calls = evaluations = 0
    else:
        score = Counter(lambda x, t: target.score(x, t, process))
        res = so.equal_cost_schedule(score, process, start_ts, target.sample(N_COST // 4, SEED + 2),
                                     SEED + 3, cost="predictor", max_iter=60, tol=1e-3)
        calls, evaluations = score.calls, score.evaluations
    return res.ts, {"calls": calls, "evaluations": evaluations, "iterations": res.n_iter,
                    "converged": res.converged, "seconds": time.perf_counter() - begin}


def quality(target, process, ts, sampler_name):
    """Exact KL (Gaussians) or (W1, modes covered) (mixtures) against p_{t_min}."""
    predictor, m = SAMPLERS[sampler_name]
    goal = target.marginal(process, process.t_min)
    if isinstance(target, models.Gaussian):
        mean, var = sm.gaussian_output_law(target, process, ts, predictor=predictor, corrector_steps=m, corrector_ratio=CORRECTOR_RATIO)
        return {"kl": sm.gaussian_kl(mean, var, goal.mean(), goal.var)}
    x_T = sm.prior_sample(process, N_SAMPLES, target.variance(), SEED + 4)
    x, _ = sm.sample(lambda x, t: target.score(x, t, process), process, ts, x_T, SEED + 5,
                     predictor=predictor, corrector_steps=m, corrector_ratio=CORRECTOR_RATIO)
    return {"w1": sm.wasserstein1(x, goal.cdf),
            "modes": sm.mode_coverage(x, target.means[:, 0], target.weights).covered}


def headline(q):
    return q["kl"] if "kl" in q else q["w1"]


def fmt(q):
    if "kl" in q:
        return f"{q['kl']:.3g}"
    return f"{q['w1']:.3g} ({q['modes']})"


def steps_needed(target, process, smap, sampler_name, goal, max_T):
    """Smallest T' <= max_T at which the corrector-optimised schedule is at least as good as `goal`."""
    for T in range(1, max_T + 1):
        if headline(quality(target, process, smap.schedule(T), sampler_name)) <= goal:
            return T
    return None


def step_schedule(target, process, T, sampler_name, start_ts, test="linear"):
    """Equal step-cost schedule for one sampler (docs/derivations.md, section 8), from exact scores by Monte Carlo."""
    score = Counter(lambda x, t: target.score(x, t, process))
    begin = time.perf_counter()
    res = so.equal_cost_schedule(score, process, start_ts, target.sample(N_STEP_COST, SEED + 6), SEED + 7,
                                 cost=retired.step_cost, step=sm.ALL_PREDICTORS[sampler_name], affine=test == "affine",
                                 max_iter=100, tol=1e-3)
    return res.ts, {"calls": score.calls, "evaluations": score.evaluations, "iterations": res.n_iter,
                    "converged": res.converged, "seconds": time.perf_counter() - begin}


def flow_schedule(target, process, T, sampler_name):
    """Equal local error against the flow (docs/derivations.md, section 9), from the exact score."""
    begin = time.perf_counter()
    score = lambda x, t: target.score(x, t, process)
    weight = "kl" if isinstance(target, models.Gaussian) else "data"
    res = sm.equal_error_schedule(score, process, T, target.sample(N_STEP_COST, SEED + 8), SEED + 9,
                                  step=sampler_name, weight=weight, max_iter=30)
    return res.ts, {"calls": 0, "evaluations": res.n_evaluations, "iterations": res.n_iter,
                    "converged": res.converged, "seconds": time.perf_counter() - begin}


def run(target_names=None, process_names=("vp_linear", "ve"), steps=STEPS, samplers=tuple(SAMPLERS),
        saved_at=(10, 20), aware_steps=AWARE_STEPS):
    """Run the benchmark; returns the Markdown report as a string."""
    targets = make_targets()
    processes = {"vp_linear": so.vp_linear(), "ve": so.ve()}
    lines, summary, costs, aware, ratios = [], [], [], [], []
    for tname in target_names or targets:
        target = targets[tname]
        gaussian = isinstance(target, models.Gaussian)
        for pname in process_names:
            process = processes[pname]
            smap, map_cost = corrector_map(target, process)
            costs.append(f"| {tname} | {pname} | corrector map ({N_GRID} levels) | {map_cost['calls']} | "
                         f"{map_cost['evaluations']:,} | {map_cost['seconds']:.2f} | Λ = {smap.length:.3f} ± {smap.length_stderr:.3f} |")
            schedules = {}
            for T in steps:
                ts_p, p_cost = predictor_schedule(target, process, T, smap.schedule(T))
                costs.append(cost_row(tname, pname, f"predictor fixed point, T = {T}", p_cost))
                c = float(np.sqrt(np.mean(target.variance())))
                schedules[T] = dict(so.baseline_schedules(process, T, c), **{"opt-corrector": smap.schedule(T),
                                                                             "opt-predictor": ts_p})
            for sname in samplers:
                # Sampler-aware rows (derived: docs/derivations.md, sections 7-9): the equal step-cost schedule, and for
                # Gaussian data the KL-optimal limit (degenerate for euler_maruyama: left out).
                own = {T: dict(schedules[T]) for T in steps}
                for T in (T for T in steps if T in aware_steps and sname in AWARE_SAMPLERS):
                    own[T]["opt-flow"], fl_cost = flow_schedule(target, process, T, sname)
                    costs.append(cost_row(tname, pname, f"equal local error, {sname}, T = {T}", fl_cost))
                    if sname == "dpmpp_2m":      # the step cost takes one-step samplers
                        own[T]["opt-step"] = own[T]["opt-flow"]
                    else:
                        own[T]["opt-step"], st_cost = step_schedule(target, process, T, sname, smap.schedule(T))
                        costs.append(cost_row(tname, pname, f"step-cost fixed point, {sname}, T = {T}", st_cost))
                    if not gaussian and sname != "dpmpp_2m":     # the constant test function too, which sees the mean
                        own[T]["opt-step-affine"], st_cost = step_schedule(target, process, T, sname,
                                                                           smap.schedule(T), "affine")
                        costs.append(cost_row(tname, pname, f"affine step-cost fixed point, {sname}, T = {T}",
                                              st_cost))
                    if gaussian:
                        begin = time.perf_counter()
                        # Started from every baseline and every rule compared with it, so that
                        # no schedule in the table can beat the limit.
                        rules = [own[T][n] for n in ("opt-corrector", "opt-predictor", "opt-step", "opt-flow")]
                        own[T]["limit"] = sm.gaussian_optimal_schedule(target, process, T, predictor=sname, starts=rules)
                        costs.append(f"| {tname} | {pname} | KL-optimal limit, {sname}, T = {T} | 0 | 0 | "
                                     f"{time.perf_counter() - begin:.2f} | exact law, L-BFGS |")
                names = list(dict.fromkeys(n for T in steps for n in own[T]))
                table = {name: {T: quality(target, process, own[T][name], sname) for T in steps if name in own[T]}
                         for name in names}
                metric = "exact KL to p_tmin" if gaussian else "W1 to p_tmin (modes covered)"
                lines.append(f"\n### {tname}, {pname}, {sname} — {metric}\n")
                lines.append("| schedule | " + " | ".join(f"T = {T}" for T in steps) + " |")
                lines.append("|---|" + "---|" * len(steps))
                best_in_col = {T: min((n for n in table if T in table[n] and n != "limit"),
                                      key=lambda n: headline(table[n][T])) for T in steps}
                for name, row in table.items():
                    cells = [("—" if T not in row else f"**{fmt(row[T])}**" if best_in_col[T] == name else fmt(row[T]))
                             for T in steps]
                    lines.append(f"| {name} | " + " | ".join(cells) + " |")
                for T in saved_at:
                    if T not in steps:
                        continue
                    base = {n: headline(table[n][T]) for n in table if not n.startswith("opt") and n != "limit"}
                    best = min(base, key=base.get)
                    need = steps_needed(target, process, smap, sname, base[best], 2 * T)
                    summary.append(f"| {tname} | {pname} | {sname} | {T} | {best} {base[best]:.3g} | "
                                   f"{headline(table['opt-corrector'][T]):.3g} | {headline(table['opt-predictor'][T]):.3g} | "
                                   f"{need if need is not None else f'> {2 * T}'} |")
                for T in (T for T in steps if "opt-step" in own[T]):
                    base = {n: headline(table[n][T]) for n in table if not n.startswith("opt") and n != "limit"}
                    best = min(base, key=base.get)
                    step_q = headline(table["opt-step"][T])
                    flow_q = headline(table["opt-flow"][T])
                    affine = (f"{fmt(table['opt-step-affine'][T])} | "
                              f"{headline(table['opt-step-affine'][T]) / base[best]:.2f}") \
                        if "opt-step-affine" in table else "— | —"
                    step_cells = "— | —" if sname == "dpmpp_2m" else f"{fmt(table['opt-step'][T])} | {step_q / base[best]:.2f}"
                    aware.append(f"| {tname} | {pname} | {sname} | {T} | {best} {fmt(table[best][T])} | "
                                 f"{fmt(table['opt-flow'][T])} | {flow_q / base[best]:.2f} | {step_cells} | {affine} |")
                    if gaussian:
                        limit = headline(table["limit"][T])
                        ratios.append((tname, pname, sname, T, limit, base[best] / limit, best,
                                       headline(table["opt-corrector"][T]) / limit,
                                       headline(table["opt-predictor"][T]) / limit,
                                       np.nan if sname == "dpmpp_2m" else step_q / limit, flow_q / limit))
            print(f"done: {tname} {pname}", flush=True)
    report = ["# Benchmark: quality per step", "",
              "Made by `python examples/benchmarks/benchmark.py` (exact scores; see its docstring for the "
              "protocol). Bold: best in its column (the limit excluded). Mixture cells: W1 (modes covered).", "",
              "## Against the KL-optimal limit (Gaussian targets)", "",
              "KL(schedule) / KL(limit), the limit being the exact-KL optimum for that sampler and T "
              "(`sampler.gaussian_optimal_schedule`; not computed for euler_maruyama, where it is "
              "degenerate; for dpmpp_2m it is degenerate too, KL down to 1e-16, so its rows are no yardstick and are "
              "left out of the summary). `opt-step`: the equal step-cost schedule (Monte Carlo from scores); "
              "`opt-flow`: the equal local error against the flow.", "",
              "| target | process | sampler | T | limit KL | best baseline | opt-corrector | opt-predictor | opt-step | "
              "opt-flow |",
              "|---|---|---|---|---|---|---|---|---|---|",
              *(f"| {t} | {p} | {s} | {T} | {lim:.3g} | {b:.2f} ({bn}) | {c:.2f} | {pr:.2f} | {st:.2f} | {fl:.2f} |"
                for t, p, s, T, lim, b, bn, c, pr, st, fl in ratios), "",
              *ratio_summary(ratios), "",
              "## The sampler-aware schedules against the best baseline", "",
              "Quality as in the tables below; `ratio` < 1: the rule is better. `opt-flow`: equal local error "
              "against the flow; `opt-step`: equal step cost; `opt-step-affine` adds the constant test function "
              "(mixtures only).", "",
              "| target | process | sampler | T | best baseline | opt-flow | ratio | opt-step | ratio | "
              "opt-step-affine | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|", *aware, "",
              "## Steps needed by the corrector-optimised schedule to match the best baseline", "",
              "Quality is KL for Gaussians and W1 for mixtures (lower is better). `steps needed`: the "
              "smallest T' at which the corrector-optimised schedule is at least as good as the best "
              "baseline at T (searched up to 2T).", "",
              "| target | process | sampler | T | best baseline | opt-corrector | opt-predictor | steps needed |",
              "|---|---|---|---|---|---|---|---|", *summary, "",
              "## Cost of finding the optimised schedules", "",
              "Score evaluations as batch calls and as per-sample evaluations; seconds on this machine "
              "(2 cores). The 64-d predictor schedule uses the closed-form cost (no score evaluations).", "",
              "| target | process | schedule | calls | evaluations | seconds | notes |",
              "|---|---|---|---|---|---|---|", *costs, "", "## All results", *lines, ""]
    return "\n".join(report)


def ratio_summary(ratios):
    """Geometric mean and worst ratio to the limit, per sampler and rule."""
    out = ["| sampler | rule | geometric mean of KL / limit | worst |", "|---|---|---|---|"]
    for sname in AWARE_SAMPLERS:
        if sname == "dpmpp_2m":
            # Its limit is degenerate (KL down to 1e-16: the optimiser cancels the multistep errors
            # of opposite signs, in 1-D and 64-D alike): no yardstick, so no summary.
            continue
        rows = [r for r in ratios if r[2] == sname]
        for label, k in (("best baseline", 5), ("opt-corrector", 7), ("opt-predictor", 8), ("opt-step", 9),
                         ("opt-flow", 10)):
            values = np.array([r[k] for r in rows])
            if len(values) and np.all(np.isfinite(values)):
                out.append(f"| {sname} | {label} | {np.exp(np.mean(np.log(values))):.3f} | {values.max():.2f} |")
    return out


def cost_row(tname, pname, what, cost):
    return (f"| {tname} | {pname} | {what} | {cost['calls']} | {cost['evaluations']:,} | {cost['seconds']:.2f} | "
            f"{cost['iterations']} iterations{'' if cost['converged'] else ', not converged'} |")


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two targets, T = 5 and 10 (the sampler-aware rules at T = 5), print only")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        report = run(["gaussian-1d", "bimodal"], ("vp_linear",), (5, 10), ("euler", "ancestral"), (10,), (5,))
    else:
        report = run()
        so.write_atomically(OUT, report + f"\nTotal time: {time.perf_counter() - start:.0f} s.\n")
    log(report)
    log(f"total time {time.perf_counter() - start:.0f} s")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
