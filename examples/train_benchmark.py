"""Training benchmark: step time, time to a Cantor model that fills all modes, online schedule.

1. Elementwise activations on a (1024, 128) float64 array (NumPy, and PyTorch if it
   is installed): why the MLP computes SiLU through tanh.
2. Time per training step of a 3-layer, width-128 MLP at batch 1024 on 1-D data,
   and, if PyTorch is installed, the same network, loss and optimiser in PyTorch on
   the CPU (float64 and float32), measured in the same run.
3. Wall time to train, on the levels of the corrector-optimised 40-step schedule,
   the 3x64 model of the Cantor example, and whether its samples (ancestral, T = 40)
   fill all eight modes; two seeds.
4. Bimodal target (the paper's Figures 2-4): training on the uniform ("linear") schedule's levels
   against training with the online schedule update (Algorithm 2): average
   log-likelihood of samples, score error, and the spread of the per-interval costs.

PyTorch is not a dependency: it is used only here, only if importable. This script
opts in to `models.retain_freed_memory()` (a process-wide glibc setting) after
measuring the step time without it; sections 3 and 4 run with it.

    python examples/train_benchmark.py              # about 4 minutes on 2 cores
    python examples/train_benchmark.py --step-time  # section 2 only
"""
import sys
import time
import timeit

import numpy as np
from autograd import value_and_grad
from autograd.misc import flatten

import models
import sampler as sm
import scoreopt as so

STEP_BATCH, STEP_WIDTH, STEP_DEPTH, TIMED_STEPS = 1024, 128, 3, 100
CANTOR = dict(width=64, depth=3, n_steps=6000, batch_size=256, lr=3e-3)   # the recipe
CANTOR_T = 40
BIMODAL = dict(width=64, depth=3, n_steps=4000, batch_size=256, lr=3e-3)
BIMODAL_STEPS = (20, 50)
ONLINE = {"online, intervals (Algorithm 2)": models.OnlineSchedule(every=50, burn_in=1000, gamma=0.1),
          "online, dense grid": models.OnlineSchedule(every=50, burn_in=1000, gamma=0.1, route="grid")}
SEED = 0

try:
    import torch
except ImportError:       # the comparison is optional
    torch = None


def activations():
    x = np.random.default_rng(SEED).standard_normal((STEP_BATCH, STEP_WIDTH))
    funcs = {"tanh": np.tanh, "SiLU z/(1+exp(-z)) (models.silu)": models.silu,
             "SiLU z(1+tanh(z/2))/2": lambda z: 0.5 * z * (1.0 + np.tanh(0.5 * z)),
             "softplus": lambda z: np.logaddexp(0.0, z)}
    print(f"\n1. Activations on a ({STEP_BATCH}, {STEP_WIDTH}) float64 array, microseconds per call")
    print("| function | NumPy | PyTorch |\n|---|---|---|")
    tx = torch.from_numpy(x) if torch else None
    tfuncs = dict(zip(funcs, ["tanh", "silu", "silu", "softplus"]))
    for name, f in funcs.items():
        ours = _best(lambda: f(x))
        theirs = f"{_best(lambda: getattr(torch.nn.functional, tfuncs[name])(tx)):.0f}" if torch else "not installed"
        print(f"| {name} | {ours:.0f} | {theirs} |")


def _best(fn, number=200):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def step_time():
    """Per-step time of `models.train` (the whole step: data, levels, features, loss,
    gradient, Adam), first with the default allocator (what a library call gets), then
    after this script opts in to `models.retain_freed_memory()` (process-wide, so it
    cannot be undone here: the default is measured first)."""
    process, target = so.vp_linear(), models.bimodal()
    ts = so.uniform_schedule(process, 50)
    params = models.init_mlp(SEED, dim=1, width=STEP_WIDTH, depth=STEP_DEPTH)
    run = lambda n: models.train(params, target, process, ts, rng=SEED, n_steps=n, batch_size=STEP_BATCH, callback=None)

    def timed():
        run(10)                                                  # warm-up
        start = time.perf_counter()
        run(TIMED_STEPS)
        return (time.perf_counter() - start) / TIMED_STEPS * 1e3
    default, core_default = timed(), _core_step_ms(params, process, ts)
    applied = models.retain_freed_memory()
    ours, core = timed(), _core_step_ms(params, process, ts)
    print(f"\n2. Training step, {STEP_DEPTH}x{STEP_WIDTH} MLP, batch {STEP_BATCH}, 1-D, scoreopt (NumPy + "
          f"autograd, float64), ms; whole `train` step / loss+gradient+Adam on prepared inputs (as PyTorch below)")
    print(f"   default allocator: {default:.2f} / {core_default:.2f}; after retain_freed_memory() "
          f"(applied: {applied}): {ours:.2f} / {core:.2f}")
    if torch is None:
        print("   PyTorch not installed: no comparison")
        return
    for dtype in (torch.float64, torch.float32):
        theirs = _torch_step_ms(dtype)
        print(f"   PyTorch {torch.__version__} CPU ({torch.get_num_threads()} threads), {dtype}: "
              f"{theirs:.2f} ms; ratio scoreopt / PyTorch, like for like (prepared inputs): "
              f"{core / theirs:.2f} (default allocator {core_default / theirs:.2f}); whole train step: "
              f"{ours / theirs:.2f}")


def _core_step_ms(params, process, ts):
    """Loss, gradient and Adam update on prepared inputs: what `_torch_step_ms` times."""
    rng = np.random.default_rng(SEED)
    x0 = models.bimodal().sample(STEP_BATCH, rng)
    t = models.draw_levels(ts, STEP_BATCH, rng)
    batch = models.prepare_dsm(params, x0, t, rng.standard_normal(x0.shape), process, 0.0, 1.0)
    loss_and_grad = value_and_grad(models.prepared_dsm_loss)
    theta, unflatten = flatten(params)
    adam = models.adam_init(theta)

    def step(theta, adam):
        _, grad = loss_and_grad(unflatten(theta), batch)
        return models.adam_step(theta, flatten(grad)[0], adam, 1e-3)
    for _ in range(10):
        theta, adam = step(theta, adam)
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        theta, adam = step(theta, adam)
    return (time.perf_counter() - start) / TIMED_STEPS * 1e3


def _torch_step_ms(dtype):
    """The same network (SiLU MLP, 10 inputs), DSM loss on prepared inputs, Adam."""
    torch.manual_seed(SEED)
    sizes = [10] + [STEP_WIDTH] * STEP_DEPTH + [1]
    layers = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(m, n, dtype=dtype), torch.nn.SiLU()]
    net = torch.nn.Sequential(*layers[:-1])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x_in = torch.randn(STEP_BATCH, 10, dtype=dtype)
    eps = torch.randn(STEP_BATCH, 1, dtype=dtype)

    def step():
        opt.zero_grad()
        loss = ((eps - net(x_in)) ** 2).sum(1).mean()
        loss.backward()
        opt.step()
    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    return (time.perf_counter() - start) / TIMED_STEPS * 1e3


def cantor():
    process, target = so.vp_linear(), models.mollified_cantor()
    smap = so.estimate_schedule_map(lambda x, t: target.score(x, t, process), process,
                                    target.sample(4000, SEED), SEED + 1)
    ts = smap.schedule(CANTOR_T)
    print(f"\n3. Cantor, vp_linear, trained on the optimised {CANTOR_T}-step schedule's levels "
          f"({CANTOR['depth']}x{CANTOR['width']} SiLU, {CANTOR['n_steps']} steps, batch "
          f"{CANTOR['batch_size']}, lr {CANTOR['lr']} cosine)")
    print("| seed | training time | modes covered (ancestral, T = 40, optimised schedule) | W1 |\n|---|---|---|---|")
    for seed in (SEED, SEED + 1):
        params = models.init_mlp(seed, width=CANTOR["width"], depth=CANTOR["depth"])
        start = time.perf_counter()
        out = models.train(params, target, process, ts, rng=seed, n_steps=CANTOR["n_steps"],
                           batch_size=CANTOR["batch_size"], lr=CANTOR["lr"], callback=None)
        seconds = time.perf_counter() - start
        x, _ = sm.sample(out.score(process), process, ts, sm.prior_sample(process, 20_000, target.variance(), 7),
                         8, predictor="ancestral")
        goal = target.marginal(process, process.t_min)
        print(f"| {seed} | {seconds:.1f} s | {sm.mode_coverage(x, target.atoms).covered} / 8 | "
              f"{sm.wasserstein1(x, goal.cdf):.4f} |")


def bimodal():
    process, target = so.vp_linear(), models.bimodal()
    exact = lambda x, t: target.score(x, t, process)
    smap = so.estimate_schedule_map(exact, process, target.sample(4000, SEED), SEED + 1)
    print(f"\n4. Bimodal, vp_linear, {BIMODAL['depth']}x{BIMODAL['width']} SiLU, {BIMODAL['n_steps']} steps from "
          "the uniform schedule; online: burn-in 1000, every 50, gamma 0.1. Mean log p0 of 20,000 "
          "ancestral samples, on the run's own final schedule / on the uniform one")
    print("| T | training | first levels of the final schedule | mean log p0, own / uniform schedule | "
          "score error on the uniform levels | max/min interval cost (final) | time |")
    print("|---|---|---|---|---|---|---|")
    for T in BIMODAL_STEPS:
        uniform = so.uniform_schedule(process, T)
        print(f"| {T} | exact score | | {_mean_log_p0(exact, smap.schedule(T))} (dense-grid optimum) / "
              f"{_mean_log_p0(exact, uniform)} | 0 | | |")
        for name, online in (("fixed uniform schedule", None), *ONLINE.items()):
            params = models.init_mlp(SEED, width=BIMODAL["width"], depth=BIMODAL["depth"])
            start = time.perf_counter()
            out = models.train(params, target, process, uniform, rng=SEED, n_steps=BIMODAL["n_steps"],
                               batch_size=BIMODAL["batch_size"], lr=BIMODAL["lr"], online=online, callback=None)
            seconds = time.perf_counter() - start
            model = out.score(process)
            err, se = sm.score_error(model, exact, process, uniform, target.sample(4000, 9), 10)
            costs, _ = so.interval_costs(model, process, out.ts, target.sample(4000, 11), 12)
            print(f"| {T} | {name} | {np.array2string(out.ts[:4], precision=3)}... | {_mean_log_p0(model, out.ts)} / "
                  f"{_mean_log_p0(model, uniform)} | {err:.5f} ± {se:.5f} | {costs.max() / costs.min():.1f} | "
                  f"{seconds:.1f} s |", flush=True)


def _mean_log_p0(score, ts):
    process, target = so.vp_linear(), models.bimodal()
    x, _ = sm.sample(score, process, ts, sm.prior_sample(process, 20_000, target.variance(), 5), 6, predictor="ancestral")
    return f"{sm.mean_log_density(x, target):.3f}"


if __name__ == "__main__":
    begin = time.perf_counter()
    if "--step-time" in sys.argv:      # only section 2 (repeat it to see the spread)
        step_time()
        sys.exit()
    activations()
    step_time()
    cantor()
    bimodal()
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")
