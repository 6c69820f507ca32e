"""Which first-layer input scale for the MLP score model, by data dimension.

Trains the 3x64 MLP of `models.init_mlp` for 3,000 steps (batch 256, lr 3e-3,
levels uniform in t, vp_linear) on a 1-D target (mollified Cantor) and on 8-mode
Gaussian mixtures in d = 8 and d = 64, with several values of `input_scale`, two
seeds each, and prints the DSM loss on a fixed held-out batch (20,000 samples,
times and noises). Its output is quoted in `models.init_mlp`'s docstring and the
README; it chose the default `input_scale = 10 / sqrt(dim)`.

    python examples/benchmarks/input_scale_benchmark.py            # about 6 minutes on 2 cores
    python examples/benchmarks/input_scale_benchmark.py --quick    # d = 1 and 8, two scales, 100 steps
"""
import argparse
import sys

import numpy as np

import models
import scoreopt as so

SCALES = (10.0, "10/sqrt(d)", 3.0, 1.0)
DIMS = (1, 8, 64)
N_STEPS, N_HELD_OUT, SEEDS = 3000, 20_000, (0, 1)
QUICK = dict(scales=("10/sqrt(d)", 1.0), dims=(1, 8), n_steps=100, n_held_out=2000)


def target_for(d, rng):
    if d == 1:
        return models.mollified_cantor()
    return models.GaussianMixture(np.ones(8), rng.standard_normal((8, d)), 0.3)


def held_out_loss(state, target, process, ts, n):
    x0 = target.sample(n, 11)
    r = np.random.default_rng(12)
    t = models.uniform_times(ts, n, r, process)
    batch = models.prepare_dsm(state.params, x0, t, r.standard_normal(x0.shape), process, state.data_mean,
                               state.data_var, state.preconditioning)
    return models.prepared_dsm_loss(state.params, batch)


def main(argv=None, log=print):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two dimensions, two scales, short runs")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else dict(scales=SCALES, dims=DIMS, n_steps=N_STEPS, n_held_out=N_HELD_OUT)
    process, rng = so.vp_linear(), np.random.default_rng(0)
    ts = so.uniform_schedule(process, 40)
    log("| d | input_scale | held-out DSM loss, mean (seed 0, seed 1) |\n|---|---|---|")
    out = {}
    for d in cfg["dims"]:
        target = target_for(d, rng)
        for scale in cfg["scales"]:
            value = 10 / np.sqrt(d) if scale == "10/sqrt(d)" else scale
            losses = []
            for seed in SEEDS:
                params = models.init_mlp(seed, dim=d, width=64, depth=3, input_scale=value)
                state = models.train(params, target, process, ts, rng=seed, n_steps=cfg["n_steps"], batch_size=256,
                                     lr=3e-3, levels="uniform")
                losses.append(held_out_loss(state, target, process, ts, cfg["n_held_out"]))
            out[d, value] = losses
            log(f"| {d} | {value:.3g} | {np.mean(losses):.4f} ({losses[0]:.4f}, {losses[1]:.4f}) |")
    return out


if __name__ == "__main__":
    models.retain_freed_memory()     # process-wide allocator opt-in, for this script only
    main(sys.argv[1:])
