"""Training benchmark: step time, and which training choices serve the online schedule.

1. Elementwise activations on a (1024, 128) float64 array (NumPy, and PyTorch if it
   is installed).
2. Time per training step of a 3-layer, width-128 MLP at batch 1024 on 1-D data, with
   EDM's preconditioning and with noise prediction, and, if PyTorch is installed, the same
   network, loss and optimiser in PyTorch on the CPU (float64 and float32), measured in
   the same run; EDM against noise prediction in alternating rounds (median and range).
3. Training choices for the online schedule: the Cantor example's optimised run (T = 20,
   Algorithm 2's dense-grid route from step 1,500, every 500; 9,000 steps at lr 5e-3)
   with each preconditioning (EDM's, and noise prediction) and way of drawing the training
   times (`levels`: the schedule's levels, between them, EDM's log-normal); two seeds;
   modes covered, mass near the atoms, samples escaped and W1 of 20,000 ancestral samples
   on the run's own schedule. The runs go two at a time, one per core, in spawned processes.
   Until 0.2 this section compared loss weights too: EDM's loss weight `1/c_out^2` was
   retired from the library in 0.3 (DSM is the only loss); its measured numbers are in
   docs/derivations.md and the reports of docs/reports.

PyTorch is not a dependency: it is used only here, only if importable. This script
opts in to `models.retain_freed_memory()` (a process-wide glibc setting) after
measuring the step time without it; section 3 runs with it.

    python examples/benchmarks/train_benchmark.py              # about 10 minutes on 2 cores
    python examples/benchmarks/train_benchmark.py --step-time  # section 2 only
    python examples/benchmarks/train_benchmark.py --quick      # every section, short (a smoke run)
"""
import os

if __name__ == "__main__":            # one BLAS thread per process, before NumPy loads (section 3)
    for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import argparse
import multiprocessing
import sys
import time
import timeit
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from autograd import value_and_grad
from autograd.misc import flatten

import models
import sampler as sm
import scoreopt as so

STEP_BATCH, STEP_WIDTH, STEP_DEPTH, TIMED_STEPS, ROUNDS = 1024, 128, 3, 100, 5
CANTOR = dict(width=64, depth=3, n_steps=9000, batch_size=256, lr=5e-3, T=20)     # cantor.py's budget
ONLINE = dict(every=500, burn_in=1500, gamma=0.5, route="grid", n_grid=100, n_samples=2000)
N_SAMPLES = 20_000
CHOICES = [("eps", "levels"),                 # the 0.1.0 model: noise prediction, on the schedule's levels
           ("eps", "between"), ("edm", "levels"), ("edm", "between"), ("edm", "lognormal")]
SEED = 0
QUICK = dict(timed_steps=10, rounds=1, n_steps=300, online=dict(ONLINE, every=100, burn_in=100, n_grid=50,
                                                                n_samples=500), n_samples=2000, seeds=1)

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


def step_time(timed_steps=TIMED_STEPS, rounds=ROUNDS):
    """Per-step time of `models.train` (the whole step: data, levels, features, loss,
    gradient, Adam), first with the default allocator (what a library call gets), then
    after this script opts in to `models.retain_freed_memory()` (process-wide, so it
    cannot be undone here: the default is measured first)."""
    process, target = so.vp_linear(), models.bimodal()
    ts = so.uniform_schedule(process, 50)
    params = models.init_mlp(SEED, dim=1, width=STEP_WIDTH, depth=STEP_DEPTH)
    run = lambda n, pre: models.train(params, target, process, ts, rng=SEED, n_steps=n, batch_size=STEP_BATCH,
                                      preconditioning=pre)

    def timed(pre):
        run(10, pre)                                             # warm-up
        start = time.perf_counter()
        run(timed_steps, pre)
        return (time.perf_counter() - start) / timed_steps * 1e3
    default, core_default = timed("edm"), _core_step_ms(params, process, ts, "edm", timed_steps)
    applied = models.retain_freed_memory()
    measured = {"edm": [], "eps": []}
    for _ in range(rounds):             # alternating, so that a change of load hits both alike
        for pre in measured:
            measured[pre].append((timed(pre), _core_step_ms(params, process, ts, pre, timed_steps)))
    times = {pre: tuple(np.median(np.array(values), axis=0)) for pre, values in measured.items()}
    ratios = [a[0] / b[0] for a, b in zip(measured["edm"], measured["eps"])]
    ours, core = times["edm"]
    print(f"\n2. Training step, {STEP_DEPTH}x{STEP_WIDTH} MLP, batch {STEP_BATCH}, 1-D, scoreopt (NumPy + "
          f"autograd, float64), ms; whole `train` step / loss+gradient+Adam on prepared inputs (as PyTorch below)")
    print(f"   EDM preconditioning, default allocator: {default:.2f} / {core_default:.2f}; after "
          f"retain_freed_memory() (applied: {applied}): {ours:.2f} / {core:.2f}")
    print(f"   noise prediction (the 0.1.0 model), after retain_freed_memory(): {times['eps'][0]:.2f} / "
          f"{times['eps'][1]:.2f}; EDM / noise prediction (whole step, median of {rounds} alternating rounds): "
          f"{np.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")
    if torch is None:
        print("   PyTorch not installed: no comparison")
        return
    for dtype in (torch.float64, torch.float32):
        theirs = _torch_step_ms(dtype, timed_steps)
        print(f"   PyTorch {torch.__version__} CPU ({torch.get_num_threads()} threads), {dtype}: "
              f"{theirs:.2f} ms; ratio scoreopt / PyTorch, like for like (prepared inputs): "
              f"{core / theirs:.2f} (default allocator {core_default / theirs:.2f}); whole train step: "
              f"{ours / theirs:.2f}")


def _core_step_ms(params, process, ts, preconditioning, timed_steps):
    """Loss, gradient and Adam update on prepared inputs: what `_torch_step_ms` times."""
    rng = np.random.default_rng(SEED)
    x0 = models.bimodal().sample(STEP_BATCH, rng)
    t = models.schedule_levels(ts, STEP_BATCH, rng, process)
    batch = models.prepare_dsm(params, x0, t, rng.standard_normal(x0.shape), process, 0.0, 1.0, preconditioning)
    loss_and_grad = value_and_grad(models.prepared_dsm_loss)
    theta, unflatten = flatten(params)
    adam = models.adam_init(theta)

    def step(theta, adam):
        _, grad = loss_and_grad(unflatten(theta), batch)
        return models.adam_step(theta, flatten(grad)[0], adam, 1e-3)
    for _ in range(10):
        theta, adam = step(theta, adam)
    start = time.perf_counter()
    for _ in range(timed_steps):
        theta, adam = step(theta, adam)
    return (time.perf_counter() - start) / timed_steps * 1e3


def _torch_step_ms(dtype, timed_steps):
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
    for _ in range(timed_steps):
        step()
    return (time.perf_counter() - start) / timed_steps * 1e3


def choices(n_steps=CANTOR["n_steps"], online=ONLINE, n_samples=N_SAMPLES, seeds=2):
    print(f"\n3. Training choices for the online schedule: Cantor, vp_linear, T = {CANTOR['T']}, "
          f"{CANTOR['depth']}x{CANTOR['width']} SiLU, {n_steps} steps, batch {CANTOR['batch_size']}, lr "
          f"{CANTOR['lr']} cosine, DSM loss; Algorithm 2, dense-grid route, from step {online['burn_in']} every "
          f"{online['every']}; {n_samples} ancestral samples on the run's own schedule")
    print("| preconditioning | training times | seed | modes covered | mass near atoms | escaped | W1 | "
          "time |\n|---|---|---|---|---|---|---|---|")
    runs = [(*choice, seed, n_steps, online, n_samples) for choice in CHOICES for seed in range(SEED, SEED + seeds)]
    # Fresh processes (spawn), each with the allocator setting; one BLAS thread each (set at the top).
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                             initializer=models.retain_freed_memory) as pool:
        for row in pool.map(_choice_run, runs):
            print(row, flush=True)


def _choice_run(args):
    preconditioning, levels, seed, n_steps, online, n_samples = args
    process, target = so.vp_linear(), models.mollified_cantor()
    start = time.perf_counter()
    out = models.train(models.init_mlp(seed, width=CANTOR["width"], depth=CANTOR["depth"]), target, process,
                       so.uniform_schedule(process, CANTOR["T"]), rng=seed, n_steps=n_steps,
                       batch_size=CANTOR["batch_size"], lr=CANTOR["lr"], levels=levels,
                       preconditioning=preconditioning, online=models.OnlineSchedule(**online))
    seconds = time.perf_counter() - start
    x = sm.sample(out.score(process), process, out.ts, sm.prior_sample(process, n_samples, target.variance(), seed + 10),
                  seed + 11, predictor="ancestral", max_growth=None).x
    cover = sm.mode_coverage(x, target.atoms)
    escaped = int(np.sum((x < -1) | (x > 2)))
    return (f"| {preconditioning} | {levels} | {seed} | {cover.covered} / 8 | {cover.masses.sum():.3f} | "
            f"{escaped} | {sm.wasserstein1(x, target.cdf):.4g} | {seconds:.0f} s |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-time", action="store_true", help="section 2 only (repeat it to see the spread)")
    parser.add_argument("--quick", action="store_true", help="every section, short: a smoke run")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    if args.step_time:
        step_time()
        return
    activations()
    if args.quick:
        step_time(QUICK["timed_steps"], QUICK["rounds"])
        choices(QUICK["n_steps"], QUICK["online"], QUICK["n_samples"], QUICK["seeds"])
    else:
        step_time()
        choices()
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
