"""Exact finite-step corrector cost of the optimised schedule against the baselines.

For data N(0, c^2) the finite-step cost sum_i L_c(t_{i+1}, t_i) has a closed form
(`scoreopt.gaussian_corrector_cost`, derived), so the comparison has no Monte-Carlo
error. Prints a Markdown table of cost(optimised) / cost(best baseline).

    python examples/finite_step_cost.py
"""
import numpy as np

import scoreopt as so

STEPS = (5, 10, 20, 50, 100)
STDS = (0.1, 0.5, 2.0)
N_GRID = 20000


def total_cost(process, ts, c):
    return so.gaussian_corrector_cost(process, ts[1:], ts[:-1], [c ** 2]).sum()


def main():
    print("| process | c | " + " | ".join(f"T = {T}" for T in STEPS) + " |")
    print("|---|---|" + "---|" * len(STEPS))
    for name, process in [("ve", so.ve()), ("vp_linear", so.vp_linear())]:
        nu_min, nu_max = so.nsr(process, [process.t_min, process.t_max])
        grid = so.time_from_nsr(process, np.geomspace(nu_min, nu_max, N_GRID))
        for c in STDS:
            delta = so.gaussian_local_cost(process, grid, [c ** 2])
            cells = []
            for T in STEPS:
                opt = total_cost(process, so.optimal_schedule(grid, delta, T), c)
                costs = {k: total_cost(process, v, c) for k, v in so.baseline_schedules(process, T, c).items()}
                best = min(costs, key=costs.get)
                cells.append(f"{opt / costs[best]:.2f} ({best})")
            print(f"| {name} | {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
