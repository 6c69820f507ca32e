"""Benchmark: the equal local-error rule at a latent-sized d = 16,384, its time and memory besides the model.

Synthetic data with a decaying spectrum (variances from 1 down to 0.01, a random rotation of its
top directions), its exact Gaussian score standing in for a model, `sampler.flow_weight` (the
default: the top 64 eigenpairs and an isotropic rest) and `sampler.equal_error_schedule` with
Heun at T = 10. Prints the seconds spent in the score and outside it, the tracemalloc peak of
each call and the process's peak resident memory (VmHWM, Linux).

    python examples/benchmarks/latent_scale.py            # d = 16,384, 2,000 data rows: about a minute
    python examples/benchmarks/latent_scale.py --quick    # d = 4,096
"""
import argparse
import os
import time
import tracemalloc

import numpy as np

import sampler as sm
import scoreopt as so

D, N, K_DATA, T = 16_384, 2_000, 256, 10


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 4,096 and 1,000 rows")
    args = parser.parse_args(argv)
    d, n = (4_096, 1_000) if args.quick else (D, N)
    rng = np.random.default_rng(0)
    # Data: K_DATA directions with variances from 1 down to 0.05, the rest at 0.01 (a fast-falling spectrum).
    basis = np.linalg.qr(rng.standard_normal((d, K_DATA)))[0]
    top = np.geomspace(1.0, 0.05, K_DATA)
    x0 = (rng.standard_normal((n, K_DATA)) * np.sqrt(top - 0.01)) @ basis.T + 0.1 * rng.standard_normal((n, d))
    process, spent = so.ve(), [0.0]

    def score(x, t):                         # the exact score of N(0, B diag(top - 0.01) B^T + 0.01 I)
        start = time.perf_counter()
        nu2 = np.reshape(process.sigma(t), (-1, 1)) ** 2
        coords = x @ basis
        out = -(x - coords @ basis.T) / (0.01 + nu2) - (coords / (top + nu2)) @ basis.T
        spent[0] += time.perf_counter() - start
        return out

    results = {}
    for name, call in (("flow_weight", lambda: sm.flow_weight(x0)),
                       ("equal_error_schedule", lambda: sm.equal_error_schedule(
                           score, process, T, x0, 0, step="heun", weight=results["flow_weight"]["out"]))):
        spent[0] = 0.0
        tracemalloc.start()
        start = time.perf_counter()
        out = call()
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results[name] = dict(out=out, seconds=seconds, model=spent[0], traced=peak / 2 ** 20)
        log(f"{name:22s} d = {d:,}, {n:,} rows: {seconds:6.1f} s, of which in the score {spent[0]:5.1f} s; "
            f"outside it {seconds - spent[0]:5.1f} s; tracemalloc peak {peak / 2 ** 20:6.0f} MB")
    res = results["equal_error_schedule"]["out"]
    log(f"equal_error_schedule: converged {res.converged} in {res.n_iter} updates, {res.n_evaluations:,} evaluations; "
        f"weight rank {results['flow_weight']['out'].basis.shape[1]}; data {x0.nbytes / 2 ** 20:.0f} MB; "
        f"peak resident memory of the process {_peak_rss_mb():.0f} MB; load {os.getloadavg()[0]:.1f}")
    return results


def _peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


if __name__ == "__main__":
    main()
