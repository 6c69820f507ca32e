"""Benchmark: the schedule map estimated serially and on several workers (SciPy's map convention).

A score that costs real time per call stands in for a large network: a 64-d MLP of width
WIDTH (EDM-preconditioned, random weights), on N samples and N_GRID levels. The same
`estimate_schedule_map` call runs serially, on a process pool (`workers=2`), on a
`multiprocessing.Pool(2).map`, on a Dask `LocalCluster` of two worker processes
(`client.get_executor().map`, and `client.map` + `gather`) and on a Ray pool
(`ray.util.multiprocessing.Pool(2).map`), where those are installed (the `dask` extra;
`pip install ray`). The results are checked to be identical to the serial one; the table
gives the wall time and its ratio to the serial run, each measured REPEATS times (the range).

    python examples/scaling_benchmark.py      # about 3 minutes on 2 cores
"""
import multiprocessing
import sys
import time

import numpy as np

import models
import scoreopt as so

WIDTH, N, N_GRID, REPEATS = 512, 2000, 24, 3
PROCESS = so.vp_linear()
PARAMS = models.init_mlp(0, dim=64, width=WIDTH, depth=3)
W, b = PARAMS[-1]
PARAMS[-1] = (np.random.default_rng(1).standard_normal(W.shape) * 0.01, b)     # not the Gaussian fit alone
SCORE = models.ScoreModel(PARAMS, PROCESS, 0.0, 0.25)       # module level: it pickles


def main(argv=None, log=print):
    x0 = np.random.default_rng(0).uniform(-1, 1, (N, 64))
    run = lambda workers: so.estimate_schedule_map(SCORE, PROCESS, x0, 1, n_grid=N_GRID, workers=workers)
    serial = run(1)
    times = {"serial": measure(lambda: run(1))}
    times["workers=2 (a process pool)"] = measure(lambda: run(2), serial, run)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        times["multiprocessing.Pool(2).map"] = measure(lambda: run(pool.map), serial, run)
    try:
        import distributed
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            times["Dask: client.get_executor().map"] = measure(lambda: run(client.get_executor().map), serial, run)
            gathered = lambda f, xs: client.gather(client.map(f, xs, pure=False))
            times["Dask: client.gather(client.map(f, xs))"] = measure(lambda: run(gathered), serial, run)
    except ImportError:
        log("dask.distributed is not installed: pip install -e '.[dask]'")
    try:
        import ray
        from ray.util.multiprocessing import Pool
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        with Pool(2) as pool:
            times["Ray: ray.util.multiprocessing.Pool(2).map"] = measure(lambda: run(pool.map), serial, run)
        ray.shutdown()
    except ImportError:
        log("ray is not installed: pip install ray")
    log(f"\nSchedule map of a 64-d MLP of width {WIDTH} ({serial.n_evaluations:,} per-sample evaluations, "
        f"{N_GRID} levels, {N} samples), 2 cores; {REPEATS} runs each, the same result as the serial run:")
    log("| workers | wall time | ratio to serial |\n|---|---|---|")
    base = np.mean(times["serial"])
    for name, values in times.items():
        log(f"| {name} | {min(values):.1f}-{max(values):.1f} s | {min(values) / base:.2f}-{max(values) / base:.2f} |")
    return times


def measure(call, serial=None, run=None):
    values = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = call()
        values.append(time.perf_counter() - start)
        if serial is not None:
            np.testing.assert_array_equal(result.Lambda, serial.Lambda)
    return values


if __name__ == "__main__":
    main(sys.argv[1:])
