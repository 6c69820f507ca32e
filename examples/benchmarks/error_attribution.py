"""Why the paper's schedules lose with DDIM and Heun: where their error is made.

For data N(0, 0.5^2) and the corrector-optimised 10-step schedule (exact local cost,
dense grid), the exact law of the sampler (`sampler.gaussian_output_law`) is read off
after every step. Printed: the KL to the marginal just before the last step (into the
clean end) and just after the first step (out of the prior), as shares of the final
KL. The v(t')^2 = sigma(t')^2 weighting of the cost makes the step into the clean end
look cheap under VE, and the first step out of the prior under VP with Heun: those
single steps carry most of the error (derived here; docs/derivations.md, sections 7-9).

    python examples/benchmarks/error_attribution.py            # about 1 s
    python examples/benchmarks/error_attribution.py --quick    # the same on a coarser grid
"""
import argparse
import sys

import models
import sampler as sm
import scoreopt as so

TARGET = models.Gaussian([0.0], [0.25])
T = 10
N_GRID, QUICK_GRID = 4000, 500          # levels of the dense grid behind the optimised schedule


def kl_after(process, ts, predictor, level):
    """KL of the sampler's law at ``ts[level]`` (run from ts[-1] down to it) to the marginal there."""
    sub = process._replace(t_min=float(ts[level]))
    mean, var = sm.gaussian_output_law(TARGET, sub, ts[level:], predictor=predictor)
    goal = TARGET.marginal(process, ts[level])
    return sm.gaussian_kl(mean, var, goal.mean(), goal.var)


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a coarser grid ({QUICK_GRID} levels)")
    args = parser.parse_args(argv)
    log("| process | sampler | nu of the last / first step | final KL | KL before the last step | "
        "share made by the last step | KL after the first step | its share of the final |")
    log("|---|---|---|---|---|---|---|---|")
    out = {}
    for name, process in (("ve", so.ve()), ("vp_linear", so.vp_linear())):
        grid = so.loglinear_schedule(process, QUICK_GRID if args.quick else N_GRID)
        ts = so.optimal_schedule(grid, so.gaussian_local_cost(process, grid, TARGET.var), T)
        nu = so.nsr(process, ts)
        for predictor in ("euler", "heun"):
            final = sm.gaussian_schedule_kl(TARGET, process, ts, predictor=predictor)
            before_last, after_first = kl_after(process, ts, predictor, 1), kl_after(process, ts, predictor, T - 1)
            out[name, predictor] = (final, before_last, after_first)
            log(f"| {name} | {predictor} | {nu[1]:.3g} → {nu[0]:.3g} / {nu[-1]:.3g} → {nu[-2]:.3g} | {final:.3g} | "
                f"{before_last:.3g} | {100 * (1 - before_last / final):.0f}% | {after_first:.3g} | "
                f"{100 * after_first / final:.0f}% |")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
