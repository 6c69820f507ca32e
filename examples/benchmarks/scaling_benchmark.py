"""Benchmark: the schedule map estimated serially and on several workers (SciPy's map convention).

A score that costs real time per call stands in for a large network: a 64-d MLP of width
WIDTH (EDM-preconditioned, random weights), on N samples and N_GRID levels. The same
`estimate_schedule_map` call runs serially, on the library's process pool (`workers=2`, started
by forkserver or spawn), on a spawn-context `multiprocessing.Pool(2).map` (started before the
clock), on a Dask `LocalCluster` of two worker processes (`client.get_executor().map`, and
`client.map` + `gather`) and on a Ray pool
(`ray.util.multiprocessing.Pool(2).map`), where those are installed (the `dask` extra;
`pip install ray`). The results are checked to be identical to the serial one; the table
gives the wall time and its ratio to the serial run, each measured REPEATS times (the range).

    python examples/benchmarks/scaling_benchmark.py            # about 3 minutes on 2 cores
    python examples/benchmarks/scaling_benchmark.py --quick    # a small model, few levels, one run each
"""
import argparse
import multiprocessing
import sys
import time

import numpy as np

import models
import scoreopt as so

WIDTH, N, N_GRID, REPEATS = 512, 2000, 24, 3
QUICK = dict(width=64, n=200, n_grid=6, repeats=1)
PROCESS = so.vp_linear()


def stand_in_score(width):
    """A 64-d MLP of this width with random weights (EDM-preconditioned): a ``models.ScoreModel``, which pickles."""
    params = models.init_mlp(0, dim=64, width=width, depth=3)
    W, b = params[-1]
    params[-1] = (np.random.default_rng(1).standard_normal(W.shape) * 0.01, b)     # not the Gaussian fit alone
    return models.ScoreModel(params, PROCESS, 0.0, 0.25)


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model on few samples and levels, one run each")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else dict(width=WIDTH, n=N, n_grid=N_GRID, repeats=REPEATS)
    score, x0 = stand_in_score(cfg["width"]), np.random.default_rng(0).uniform(-1, 1, (cfg["n"], 64))
    run = lambda workers: so.estimate_schedule_map(score, PROCESS, x0, 1, n_grid=cfg["n_grid"], workers=workers)
    measure = lambda call, serial=None: measured(call, cfg["repeats"], serial)
    serial = run(1)
    times = {"serial": measure(lambda: run(1))}
    times["workers=2 (the library's pool)"] = measure(lambda: run(2), serial)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(abs, range(4), chunksize=1)           # the workers have started (and imported) before the clock
        times["multiprocessing.get_context('spawn').Pool(2).map"] = measure(lambda: run(pool.map), serial)
    try:
        import distributed
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            times["Dask: client.get_executor().map"] = measure(lambda: run(client.get_executor().map), serial)
            gathered = lambda f, xs: client.gather(client.map(f, xs, pure=False))
            times["Dask: client.gather(client.map(f, xs))"] = measure(lambda: run(gathered), serial)
    except ImportError:
        log("dask.distributed is not installed: pip install -e '.[dask]'")
    try:
        import ray
        from ray.util.multiprocessing import Pool
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with Pool(2) as pool:
            times["Ray: ray.util.multiprocessing.Pool(2).map"] = measure(lambda: run(pool.map), serial)
        ray.shutdown()
    except ImportError:
        log("ray is not installed: pip install ray")
    log(f"\nSchedule map of a 64-d MLP of width {cfg['width']} ({serial.n_evaluations:,} per-sample evaluations, "
        f"{cfg['n_grid']} levels, {cfg['n']} samples), 2 cores; {cfg['repeats']} runs each, the same result as the "
        "serial run:")
    log("| workers | wall time | ratio to serial |\n|---|---|---|")
    base = np.mean(times["serial"])
    for name, values in times.items():
        log(f"| {name} | {min(values):.1f}-{max(values):.1f} s | {min(values) / base:.2f}-{max(values) / base:.2f} |")
    return times


def measured(call, repeats, serial=None):
    """Wall times of ``repeats`` calls; each result checked to be the serial one."""
    values = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        values.append(time.perf_counter() - start)
        if serial is not None:
            np.testing.assert_array_equal(result.Lambda, serial.Lambda)
    return values


if __name__ == "__main__":
    main(sys.argv[1:])
