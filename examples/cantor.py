"""Mollified Cantor target: the linear schedule misses modes that the optimised one fills.

The paper's Figure 1. Eight narrow modes (`models.mollified_cantor()`),
the `vp_linear` process, T steps of the ancestral sampler (the DDPM posterior step).

1. Trained models. The same small MLP, the same budget and seed, trained twice:
   - "linear": on the levels of the uniform-in-t ("linear") schedule, sampled on it;
   - "optimised": the same for BURN_IN steps; then every EVERY steps the
     corrector-optimised schedule is estimated *from the model itself* (dense-grid map,
     docs/derivations.md section 5) and blended in with rate GAMMA (Algorithm 2, dense-grid route:
     `OnlineSchedule(route="grid")`), training on its levels; sampled on the final
     schedule.
2. Exact scores (no training): the same two schedules' effect alone, with the
   schedule map estimated from the exact score.

Printed: W1 to p_0 (exact CDF), modes holding a fair share, mass within a quarter
mode spacing of the atoms, the samples a model throws more than one interval away
(counted, and W1 without them), and Lambda +- s.e. of each schedule map. Figures (PNG,
matplotlib from the `examples` extra): the true density, the two sample densities
and the two schedules (nu against step), for trained and for exact scores.

    python examples/cantor.py             # about 40 s on 2 cores
    python examples/cantor.py --quick     # about 15 s
    python examples/cantor.py --seed 1 --out /tmp/cantor
"""
import argparse
import os
import sys
import time

import numpy as np

import models
import sampler as sm
import scoreopt as so

T = 20                       # sampling steps; also the levels the models train on
SAMPLER = "ancestral"        # DDPM posterior step (k-diffusion's sample_euler_ancestral)
N_SAMPLES = 20_000           # generated samples per density
N_COST = 4_000               # data samples behind each schedule map
MODEL = dict(width=64, depth=3)
TRAIN = dict(n_steps=6000, batch_size=256, lr=3e-3)
BURN_IN = 1500               # steps on the linear schedule before the optimised one is estimated
EVERY, GAMMA = 500, 0.5      # then re-estimated from the model every EVERY steps, blended with GAMMA
QUICK = dict(n_steps=1500, burn_in=500, n_samples=5000)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "cantor")


def evaluate(score, process, target, ts, n, seed):
    """Samples on schedule ``ts``: W1 to p_0, modes covered, mass near the atoms, and the
    samples a trained model throws far away (counted, not refused: ``max_growth=None``)."""
    x_T = sm.prior_sample(process, n, target.variance(), seed)
    x, _ = sm.sample(score, process, ts, x_T, seed + 1, predictor=SAMPLER, max_growth=None)
    cover = sm.mode_coverage(x, target.atoms)
    lo, hi = target.interval
    far = (x[:, 0] < lo - (hi - lo)) | (x[:, 0] > hi + (hi - lo))
    return {"x": x[:, 0], "ts": ts, "w1": sm.wasserstein1(x, target.cdf), "modes": cover.covered,
            "mass": float(cover.masses.sum()), "escaped": int(far.sum()),
            "w1_rest": sm.wasserstein1(x[~far], target.cdf)}


def schedule_map(score, process, target, seed):
    return so.estimate_schedule_map(score, process, target.sample(N_COST, seed), seed + 1)


def train_pair(process, target, steps, n_steps, burn_in, seed, log):
    """The linear-schedule model and the optimised-schedule model: same init, data, budget."""
    linear = so.uniform_schedule(process, steps)
    online = models.OnlineSchedule(every=EVERY, burn_in=burn_in, gamma=GAMMA, route="grid",
                                   n_samples=N_COST)
    out = {}
    for name, update in (("linear", None), ("optimised", online)):
        start = time.perf_counter()
        run = models.train(models.init_mlp(seed, **MODEL), target, process, linear, rng=seed,
                           n_steps=n_steps, batch_size=TRAIN["batch_size"], lr=TRAIN["lr"],
                           online=update, callback=progress(name, n_steps, log))
        out[name] = (run, time.perf_counter() - start)
    return out


def progress(name, n_steps, log):
    def callback(step, n_steps, info):
        if step % max(1, n_steps // 4) == 0 or step == n_steps:
            log(f"  training {name:9s} step {step:5d}/{n_steps}  loss {info['loss']:.4f}  {info['elapsed']:.1f} s")
    return callback


def main(argv=None, log=print):
    """Run the example; returns the numbers it prints (a dict)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a shorter run (fewer steps and samples)")
    parser.add_argument("--out", default=OUT, help="folder for the PNG figures")
    parser.add_argument("--steps", type=int, default=T, help=f"sampling steps T (default {T})")
    args = parser.parse_args(argv)
    n_steps, burn_in, n = ((QUICK["n_steps"], QUICK["burn_in"], QUICK["n_samples"]) if args.quick
                           else (TRAIN["n_steps"], BURN_IN, N_SAMPLES))
    begin = time.perf_counter()
    process, target = so.vp_linear(), models.mollified_cantor()
    exact = lambda x, t: target.score(x, t, process)

    # Exact scores: the schedule's effect alone.
    exact_map = schedule_map(exact, process, target, args.seed)
    steps = args.steps
    results = {"T": steps,
               "exact": {"linear": evaluate(exact, process, target, so.uniform_schedule(process, steps), n, args.seed + 10),
                         "optimised": evaluate(exact, process, target, exact_map.schedule(steps), n, args.seed + 10)}}
    results["exact"]["Lambda"] = (exact_map.length, exact_map.length_stderr)

    # Trained models: same MLP, budget and seed; the optimised run re-estimates its
    # schedule from the model, after a burn-in, every EVERY steps.
    log(f"Training two {MODEL['depth']}x{MODEL['width']} MLPs for {n_steps} steps each (the optimised "
        f"one updates its schedule from step {burn_in} on, every {EVERY} steps):")
    runs = train_pair(process, target, steps, n_steps, burn_in, args.seed, log)
    results["trained"] = {}
    for name, (run, seconds) in runs.items():
        results["trained"][name] = dict(evaluate(run.score(process), process, target, run.ts, n, args.seed + 10),
                                        seconds=seconds)
    model_map = schedule_map(runs["optimised"][0].score(process), process, target, args.seed + 2)
    results["trained"]["Lambda"] = (model_map.length, model_map.length_stderr)

    report(results, n, log)
    figures = plot(results, target, process, args.out, log)
    log(f"\ntotal time {time.perf_counter() - begin:.1f} s")
    return dict(results, figures=figures)


def report(results, n, log):
    log(f"\nMollified Cantor (8 modes), vp_linear, {SAMPLER} sampler, T = {results['T']}, {n} samples; "
        "W1 to p_0, modes holding half their share, mass within a quarter spacing of the atoms:")
    log("| scores | schedule | W1 | modes covered | mass near atoms | samples escaped (> 1 interval away) | "
        "W1 without them | Lambda ± s.e. of the map |")
    log("|---|---|---|---|---|---|---|---|")
    for kind in ("exact", "trained"):
        lam, se = results[kind]["Lambda"]
        for name in ("linear", "optimised"):
            r = results[kind][name]
            note = f"{lam:.3f} ± {se:.3f}" if name == "optimised" else ""
            log(f"| {kind} | {name} | {r['w1']:.4f} | {r['modes']} / 8 | {r['mass']:.3f} | {r['escaped']} | "
                f"{r['w1_rest']:.4f} | {note} |")


def plot(results, target, process, out, log):
    """Figure 1 (trained) and Figure 2 (exact scores); returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("\nmatplotlib is not installed: no figures (pip install -e '.[examples]' for them)")
        return []
    os.makedirs(out, exist_ok=True)
    grid = np.linspace(-0.1, 1.1, 1201)
    true = np.exp(target.log_prob(grid[:, None]))
    paths = []
    for number, kind in ((1, "trained"), (2, "exact")):
        fig, axes = plt.subplots(1, 4, figsize=(15, 3.7))
        axes[0].plot(grid, true, color="black", lw=1)
        axes[0].set_title("true density $p_0$")
        for ax, name, color in ((axes[1], "linear", "tab:red"), (axes[2], "optimised", "tab:blue")):
            r = results[kind][name]
            ax.plot(grid, true, color="black", lw=0.6, alpha=0.5, label="$p_0$")
            ax.hist(r["x"], bins=240, range=(grid[0], grid[-1]), density=True, color=color, alpha=0.7,
                    label="samples")
            stray = f", {r['escaped']} escaped" if r["escaped"] else ""
            ax.set_title(f"{name} schedule\n{r['modes']}/8 modes, W1 {r['w1']:.3g}{stray}", fontsize=10)
            ax.legend(loc="upper right", fontsize=8)
        for ax in axes[:3]:
            ax.set_xlabel("x")
            ax.set_ylabel("density")
            ax.set_ylim(0, 1.15 * true.max())
        for name, color in (("linear", "tab:red"), ("optimised", "tab:blue")):
            ts = results[kind][name]["ts"]
            axes[3].semilogy(np.arange(len(ts)), so.nsr(process, ts), "o-", ms=3,
                             color=color, label=name)
        axes[3].set_xlabel("step i (0 = data end)")
        axes[3].set_ylabel(r"noise level $\nu(t_i)$")
        axes[3].set_title("schedules")
        axes[3].legend(fontsize=8)
        scores = "trained MLP" if kind == "trained" else "exact scores"
        fig.suptitle(f"Mollified Cantor, vp_linear, {SAMPLER} sampler, T = {results['T']}, {scores}")
        fig.tight_layout()
        path = os.path.join(out, f"figure{number}_{kind}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    log("\nfigures: " + ", ".join(os.path.abspath(p) for p in paths))
    return paths


if __name__ == "__main__":
    # Opt in to the allocator setting that makes training steps about 2x faster here
    # (process-wide, so only in this script, never in the library: README).
    models.retain_freed_memory()
    main(sys.argv[1:])
