"""Benchmark: which schedule for a float32 PyTorch U-Net on RGB image patches, sampled by k-diffusion.
Writes docs/reports/image.md and docs/reports/image.png (issue 26, part 1).

What a user with an image model does, end to end, at two image sizes:

1. Data: RGB patches of scikit-image's bundled colour photographs (PHOTOS), values scaled to
   [-1, 1], 16x16 (d = 768) and 32x32 (d = 3,072). The same number of patches from every
   photograph; training patches from the left 80% of each photograph, held-out patches from
   the right 20% (held out by position).
2. Model: a small U-Net-like convolutional denoiser in PyTorch (float32) with EDM's
   preconditioning (Karras et al. 2022; sigma_data from the data), in k-diffusion's
   convention D(x, sigma), trained with EDM's loss and log-normal sigmas; two model seeds per
   size. The weights are saved under the output folder (model_{size}_{seed}.pt) and reused.
3. The model as a NumPy score: `score_from_denoiser(denoiser, ve())`, nu from 0.002 to 80.
4. Schedules at T = 10 steps (11 noise levels before the final 0, k-diffusion's
   `sigmas(n=11)`): the baselines (k-diffusion's Karras rho = 7 and rho = 3 and exponential;
   uniform in t, cosine, arctan from `scoreopt.baseline_schedules`), the paper's corrector map
   (`estimate_schedule_map`, budget 100,000), the equal local-error rule
   (`sampler.equal_error_schedule`, weights "data" and "scalar") for each sampler's step, and
   GITS (`sampler.teacher_schedule`) for Euler and Heun. RULES below is the list; a rule is
   one line there.
5. Samplers: k-diffusion's own sample_euler, sample_heun, sample_dpmpp_2m and
   sample_euler_ancestral on these sigmas. The project's `sampler.sample(..., denoise=True)`
   is checked against them on the same schedules (and, for the ancestral step, the same noise).
6. Metrics from one fixed prior draw per model: the coupled error (mean squared distance per
   coordinate to the model's own 200-level Karras-sigma Heun solution from the same draw;
   deterministic samplers), sliced W1 and MMD^2 to the held-out patches; floors.

    pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu   # CPU wheels, a few hundred MB
    pip install -e '.[image]'     # torch, k-diffusion (and setuptools<81, which it imports), scikit-image, matplotlib
    # (without the first line, k-diffusion's unpinned torchvision can pull the newest CUDA torch: several GB)
    python examples/benchmarks/image_benchmark.py                 # trains 4 models or reuses them; writes docs/reports/
    python examples/benchmarks/image_benchmark.py --quick         # a smoke run, a few minutes; does not write docs/
    python examples/benchmarks/image_benchmark.py --train-only --sizes 16 --seeds 0    # one model
"""
import argparse
import copy
import gc
import io
import math
import os
import pickle
import platform
import sys
import time
import tracemalloc
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional

import numpy as np

import sampler as sm
import scoreopt as so

try:
    import skimage.data
    import torch
    import torch.nn.functional as F
    from k_diffusion import sampling
except Exception as err:           # ImportError, or k-diffusion's own imports failing (pkg_resources, torchvision)
    sys.exit(f"this benchmark needs PyTorch, k-diffusion and scikit-image ({type(err).__name__}: {err}): "
             "pip install -e '.[image]' (torch, k-diffusion, 'setuptools<81', scikit-image, matplotlib)")

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
REPORT = os.path.join(ROOT, "docs", "reports", "image.md")
FIGURE = os.path.join(ROOT, "docs", "reports", "image.png")
OUT = os.path.join(ROOT, "out", "image_benchmark")

# Data: every RGB photograph bundled with scikit-image (colorwheel and logo are drawings; the
# others need a download). The same number of patches from each.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
SIZES = (16, 32)
STRIDE = dict(train=2, held_out=4)
N_TRAIN, N_HELD_OUT = 49_000, 4_200
N_SAMPLES = {16: 1000, 32: 500}          # samples per row, from one prior draw per model (fewer at 32x32: run time)
N_MMD = 1000                             # MMD^2 on the first N_MMD samples (scipy's cdist is O(n^2 d))
N_X0 = 5000                              # training patches given to the schedule rules
SEEDS = (0, 1)

# Models (about 0.36 M and 1.0 M parameters) and their training (EDM's loss, log-normal sigmas).
MODEL = {16: dict(channels=(32, 64), patch=2, emb=64), 32: dict(channels=(40, 80, 96), patch=4, emb=64)}
TRAIN = {16: dict(steps=8000, batch_size=128, lr=2e-3, warmup=250, ema=0.999),
         32: dict(steps=5000, batch_size=96, lr=2e-3, warmup=250, ema=0.999)}
P_MEAN, P_STD = -1.2, 1.2
THREADS = 2

PROCESS = so.ve()                        # k-diffusion's convention: x = y, sigma = nu, from 0.002 to 80 (EDM)
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
T = 10                                   # steps; k-diffusion's n = T + 1 levels and a final 0
N_LEVELS = T + 1
REFERENCE_LEVELS = 200                   # the model's own solution: sample_heun on get_sigmas_karras(200)
BATCH = 1000                             # rows per model call in the NumPy denoiser and the library
BUDGET = 100_000                         # the corrector map's per-sample evaluations
SAMPLERS = {"euler": "sample_euler", "heun": "sample_heun", "dpmpp_2m": "sample_dpmpp_2m",
            "ancestral": "sample_euler_ancestral"}
DETERMINISTIC = ("euler", "heun", "dpmpp_2m")
N_AGREEMENT = 256                        # samples for the check of sampler.sample against k-diffusion
PRIOR_SEED, NOISE_SEED, RULE_SEED = 100, 200, 300

QUICK = dict(sizes=(16,), seeds=(0,), n_train=7_000, n_held_out=1_400, n_samples={16: 300, 32: 300}, n_mmd=300,
             n_x0=2000, n_agreement=64, train={16: dict(TRAIN[16], steps=400), 32: dict(TRAIN[32], steps=300)},
             model_prefix="quick_")


# --------------------------------------------------------------------------------
# The rules. Each finds a schedule, once per model (per_sampler=False) or for each sampler's
# step; `find(ctx, step)` returns k-diffusion sigmas (a tensor), a schedule `ts`, a
# ScheduleMap, or a result with `.ts` and `.n_evaluations`. Add a rule with one line, e.g.
#     "equal error (lowrank)": equal_error("lowrank"),
#     "equal error (kl)": equal_error(lambda ctx: sm.flow_weight(ctx.x0, "kl")),
# --------------------------------------------------------------------------------

class Rule(NamedTuple):
    find: Callable                      # find(ctx, step) -> sigmas, ts, ScheduleMap or result
    per_sampler: bool = False           # found for each sampler's step
    samplers: Optional[tuple] = None    # the samplers it applies to (None: all)
    baseline: bool = False


def baseline(find):
    return Rule(lambda ctx, step: find(ctx), baseline=True)


def karras(rho):
    return baseline(lambda ctx: sampling.get_sigmas_karras(N_LEVELS, SIGMA_MIN, SIGMA_MAX, rho=rho))


def library_baseline(name):
    return baseline(lambda ctx: so.baseline_schedules(ctx.process, T, ctx.sigma_data)[name])


def equal_error(weight):
    """The equal local-error rule with a weight: a name, a FlowWeight, or a function of the context."""
    return Rule(lambda ctx, step: sm.equal_error_schedule(
        ctx.score, ctx.process, T, ctx.x0, ctx.rng, step=step, weight=weight(ctx) if callable(weight) else weight,
        batch_size=BATCH), per_sampler=True)


RULES = {
    "EDM ρ=7": karras(7.0),                                       # k-diffusion's get_sigmas_karras (its default)
    "EDM ρ=3": karras(3.0),
    "exponential": baseline(lambda ctx: sampling.get_sigmas_exponential(N_LEVELS, SIGMA_MIN, SIGMA_MAX)),
    "uniform t": library_baseline("uniform"),                     # under ve() uniform in t is log-linear
    "cosine": library_baseline("cosine"),
    "arctan": library_baseline("arctan"),
    "corrector map": Rule(lambda ctx, step: so.estimate_schedule_map(ctx.score, ctx.process, ctx.x0, ctx.rng,
                                                                     budget=BUDGET, batch_size=BATCH)),
    # weight "data" (the default) is "full" up to d = sm.FULL_RANK_MAX (1,024) and "rank 64" above it
    "equal error (full)": equal_error(lambda ctx: sm.flow_weight(ctx.x0, "data", rank=ctx.x0.shape[1])),
    "equal error (rank 64)": equal_error(lambda ctx: sm.flow_weight(ctx.x0, "data", rank=sm.LOW_RANK)),
    "equal error (scalar)": equal_error("scalar"),
    "GITS": Rule(lambda ctx, step: sm.teacher_schedule(ctx.score, ctx.process, T, ctx.x0, ctx.rng, step=step,
                                                       batch_size=BATCH), per_sampler=True, samplers=("euler", "heun")),
}


def main(argv=None, log=print):
    cfg = settings(argv)
    return run(cfg, log)


def settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run; does not write docs/reports/")
    parser.add_argument("--out", default=OUT, help="folder for the models, logs and the quick run's files")
    parser.add_argument("--sizes", type=int, nargs="+", help="patch sizes (default: 16 32)")
    parser.add_argument("--seeds", type=int, nargs="+", help="model seeds (default: 0 1)")
    parser.add_argument("--models", nargs="+", metavar="SIZE:SEED",
                        help="only these models, e.g. --models 16:0 16:1 32:0 (default: every size with every seed)")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the models and stop")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report and figure again from the last run's results.pkl in --out")
    args = parser.parse_args(argv)
    cfg = dict(sizes=SIZES, seeds=SEEDS, photos=PHOTOS, n_train=N_TRAIN, n_held_out=N_HELD_OUT,
               n_samples=dict(N_SAMPLES), n_mmd=N_MMD, n_x0=N_X0, n_agreement=N_AGREEMENT, model=dict(MODEL),
               train=dict(TRAIN), rules=tuple(RULES), samplers=tuple(SAMPLERS), model_prefix="",
               reference_levels=REFERENCE_LEVELS,
               write_docs=not args.quick, quick=args.quick, out=args.out, threads=args.threads,
               train_only=args.train_only, figure=True, report_only=args.report_only,
               command="python examples/benchmarks/image_benchmark.py" + "".join(f" {a}" for a in (argv or [])))
    if args.quick:
        cfg.update(QUICK)
    if args.sizes:
        cfg["sizes"] = tuple(args.sizes)
    if args.seeds:
        cfg["seeds"] = tuple(args.seeds)
    if args.models:
        try:
            pairs = [tuple(int(v) for v in m.split(":")) for m in args.models]
            assert all(len(p) == 2 for p in pairs)
        except (ValueError, AssertionError):
            parser.error(f"--models takes SIZE:SEED pairs such as 16:0, got {' '.join(args.models)}")
        cfg.update(sizes=tuple(dict.fromkeys(p[0] for p in pairs)), seeds=tuple(dict.fromkeys(p[1] for p in pairs)),
                   models=tuple(pairs))
    if args.train_only:
        cfg["write_docs"] = False
    return cfg


def run(cfg, log=print):
    torch.set_num_threads(cfg["threads"])
    os.makedirs(cfg["out"], exist_ok=True)
    if cfg.get("report_only"):
        with open(os.path.join(cfg["out"], "results.pkl"), "rb") as f:
            results = pickle.load(f)
        return write_outputs(results, dict(results["cfg"], write_docs=cfg["write_docs"]), log)
    begin, load_start = time.perf_counter(), os.getloadavg()
    results = {"cfg": cfg, "models": {}, "rows": [], "found": [], "floors": {}, "agreement": [], "calls": {},
               "samples": {}, "trained_now": {}, "loads": [load_start[0]],
               "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset")}
    for size in cfg["sizes"]:
        train, held_out = patches(size, cfg["n_train"], cfg["n_held_out"], cfg["photos"])
        log(f"{size}x{size}: {len(train)} training and {len(held_out)} held-out patches (d = {train.shape[1]}), "
            f"sigma_data {train.std():.4f}")
        n = min(cfg["n_samples"][size], len(held_out))
        results["floors"][(size, "train")] = dict(
            sliced_w1=sm.sliced_wasserstein(train[:n], held_out[:n], 0),
            mmd2=sm.mmd2(train[:cfg["n_mmd"]], held_out[:cfg["n_mmd"]]))
        results["samples"][(size, "data")] = train[:16]
        for seed in cfg["seeds"]:
            if cfg.get("models") and (size, seed) not in cfg["models"]:
                continue
            path = os.path.join(cfg["out"], f"{cfg['model_prefix']}model_{size}_{seed}.pt")
            model, info = trained_model(size, seed, train, held_out, cfg, path, log)
            results["models"][(size, seed)] = info
            if info.get("trained_now"):
                results["trained_now"][(size, seed)] = info["seconds"]
            results["loads"].append(os.getloadavg()[0])
            if not cfg["train_only"]:
                evaluate(model, size, seed, train, held_out, cfg, results, log)
                results["loads"].append(os.getloadavg()[0])
                results["seconds"], results["load"] = time.perf_counter() - begin, (load_start, os.getloadavg())
                so.write_atomically(os.path.join(cfg["out"], "results.pkl"), pickle.dumps(results))
            del model
            gc.collect()
    results["seconds"], results["load"] = time.perf_counter() - begin, (load_start, os.getloadavg())
    if cfg["train_only"]:
        return results
    so.write_atomically(os.path.join(cfg["out"], "results.pkl"), pickle.dumps(results))
    return write_outputs(results, cfg, log)


def write_outputs(results, cfg, log):
    """The report and the figure, from a run's results."""
    results["report"] = report(results, cfg)
    figure_path = FIGURE if cfg["write_docs"] else os.path.join(cfg["out"], "image.png")
    results["figures"] = figures(results, cfg, figure_path, log) if cfg["figure"] else []
    if cfg["write_docs"]:
        os.makedirs(os.path.dirname(REPORT), exist_ok=True)
        so.write_atomically(REPORT, results["report"])
        log(f"wrote {os.path.abspath(REPORT)}")
    else:
        so.write_atomically(os.path.join(cfg["out"], "image.md"), results["report"])
    log(f"total {results['seconds'] / 60:.1f} minutes")
    return results


# --------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------

def patches(size, n_train, n_held_out, photos=PHOTOS):
    """RGB patches in [-1, 1], rows in (channel, height, width) order, float32: an equal number from
    each photograph, training ones from the left 80% of it and held-out ones from the right 20%
    (a fixed random subset of the windows at STRIDE), each set shuffled."""
    rng = np.random.default_rng(size)
    out = {"train": [], "held_out": []}
    for name in photos:
        image = getattr(skimage.data, name)()[..., :3].astype(np.float32) / 127.5 - 1.0
        cut = int(0.8 * image.shape[1])
        for part, key, total in ((image[:, :cut], "train", n_train), (image[:, cut:], "held_out", n_held_out)):
            windows = np.lib.stride_tricks.sliding_window_view(part, (size, size), axis=(0, 1))
            windows = windows[::STRIDE[key], ::STRIDE[key]]           # (rows, cols, 3, size, size)
            rows, cols = windows.shape[:2]
            pick = rng.choice(rows * cols, min(total // len(photos), rows * cols), replace=False)
            out[key].append(windows[pick // cols, pick % cols].reshape(len(pick), -1))
    train, held_out = np.vstack(out["train"]), np.vstack(out["held_out"])
    return train[rng.permutation(len(train))], held_out[rng.permutation(len(held_out))]


# --------------------------------------------------------------------------------
# The model: a small U-Net with EDM's preconditioning, k-diffusion's D(x, sigma)
# --------------------------------------------------------------------------------

class Block(torch.nn.Module):
    """A residual block: GroupNorm, SiLU, 3x3 conv, the noise level as scale and shift, again; the
    second conv starts at zero."""

    def __init__(self, c_in, c_out, emb):
        super().__init__()
        self.norm1 = torch.nn.GroupNorm(math.gcd(8, c_in), c_in)
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = torch.nn.Linear(emb, 2 * c_out)
        self.norm2 = torch.nn.GroupNorm(math.gcd(8, c_out), c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, padding=1)
        torch.nn.init.zeros_(self.conv2.weight)
        torch.nn.init.zeros_(self.conv2.bias)
        self.skip = torch.nn.Conv2d(c_in, c_out, 1) if c_in != c_out else torch.nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class UNet(torch.nn.Module):
    """U-Net on `patch` x `patch` pixel groups (pixel_unshuffle, as a patch embedding): one block per
    level, average pooling down, nearest upsampling with skip connections up; the noise level
    through Fourier features and an MLP."""

    def __init__(self, channels, patch, emb):
        super().__init__()
        self.patch = patch
        self.register_buffer("freqs", torch.randn(emb // 2, generator=torch.Generator().manual_seed(0)))
        self.embed = torch.nn.Sequential(torch.nn.Linear(emb, emb), torch.nn.SiLU(), torch.nn.Linear(emb, emb))
        self.inp = torch.nn.Conv2d(3 * patch ** 2, channels[0], 3, padding=1)
        self.down = torch.nn.ModuleList([Block(channels[max(i - 1, 0)], c, emb) for i, c in enumerate(channels)])
        self.mid = Block(channels[-1], channels[-1], emb)
        self.up = torch.nn.ModuleList([Block(channels[i] + channels[min(i + 1, len(channels) - 1)], channels[i], emb)
                                       for i in reversed(range(len(channels)))])
        self.out = torch.nn.Conv2d(channels[0], 3 * patch ** 2, 3, padding=1)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise):
        f = 2 * math.pi * c_noise[:, None] * self.freqs[None, :]
        emb = self.embed(torch.cat([f.cos(), f.sin()], dim=1))
        h, skips = self.inp(F.pixel_unshuffle(x, self.patch)), []
        for i, block in enumerate(self.down):
            h = block(F.avg_pool2d(h, 2) if i else h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i, block in zip(reversed(range(len(self.down))), self.up):
            if h.shape[-1] != skips[i].shape[-1]:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips[i]], dim=1), emb)
        return F.pixel_shuffle(self.out(F.silu(h)), self.patch)


class Denoiser(torch.nn.Module):
    """EDM's preconditioning (Karras et al. 2022, Table 1): D(x, sigma) = c_skip x + c_out F(c_in x, c_noise),
    c_skip = sd^2/(sigma^2 + sd^2), c_out = sigma sd/sqrt(sigma^2 + sd^2), c_in = 1/sqrt(sigma^2 + sd^2),
    c_noise = log(sigma)/4; k-diffusion's convention (x of shape (n, 3, H, W), sigma (n,))."""

    def __init__(self, net, sigma_data):
        super().__init__()
        self.net, self.sigma_data = net, float(sigma_data)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1).expand(len(x))
        s2, sd = sigma[:, None, None, None] ** 2, self.sigma_data
        c_skip, c_out, c_in = sd ** 2 / (s2 + sd ** 2), s2.sqrt() * sd / (s2 + sd ** 2).sqrt(), 1 / (s2 + sd ** 2).sqrt()
        return c_skip * x + c_out * self.net(c_in * x, sigma.log() / 4)


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())


def edm_loss(model, x0, sigma, noise):
    """EDM's loss: lambda(sigma) |D(x0 + sigma n, sigma) - x0|^2, lambda = (sigma^2 + sd^2)/(sigma sd)^2."""
    sd = model.sigma_data
    weight = ((sigma ** 2 + sd ** 2) / (sigma * sd) ** 2)[:, None, None, None]
    return (weight * (model(x0 + sigma[:, None, None, None] * noise, sigma) - x0) ** 2).mean()


def trained_model(size, seed, train, held_out, cfg, path, log):
    """The trained model of this size and seed: loaded from `path` when its settings match, otherwise
    trained (resuming from `path`.partial if a run was interrupted) and saved there."""
    config = dict(size=size, seed=seed, model=cfg["model"][size], train=cfg["train"][size], photos=list(cfg["photos"]),
                  n_train=len(train), p_mean=P_MEAN, p_std=P_STD, stride=STRIDE)
    wait_for_lock(path, log)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["config"] == config:
            model = Denoiser(UNet(**cfg["model"][size]), saved["sigma_data"])
            model.load_state_dict(saved["ema"])
            log(f"  model {size}x{size} seed {seed}: loaded {path} ({n_parameters(model):,} parameters, trained "
                f"{saved['info']['seconds'] / 60:.1f} min with {saved['info']['threads']} threads)")
            return model.eval(), saved["info"]
        log(f"  {path} was trained with other settings: training again")
    lock = path + ".lock"
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)        # another run waits for this one (above)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        model, info = train_model(size, seed, train, held_out, cfg, config, path, log)
    finally:
        os.unlink(lock)
    return model, dict(info, trained_now=True)


def wait_for_lock(path, log, poll=30.0):
    """Wait while another process trains this model (its `path`.lock names a live process id)."""
    lock, said = path + ".lock", False
    while os.path.exists(lock):
        try:
            with open(lock) as f:
                pid = int(f.read().strip() or 0)
            os.kill(pid, 0)
        except (OSError, ValueError):                          # a stale lock: its process is gone
            if os.path.exists(lock):
                os.unlink(lock)
            break
        if not said:
            log(f"  waiting for process {pid}, which is training {path}")
            said = True
        time.sleep(poll)


def train_model(size, seed, train, held_out, cfg, config, path, log):
    settings_ = cfg["train"][size]
    torch.manual_seed(seed)
    model = Denoiser(UNet(**cfg["model"][size]), float(train.std()))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=settings_["lr"], betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1000 + seed)
    data = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32)).reshape(-1, 3, size, size)
    partial, start, seconds, losses = path + ".partial", 0, 0.0, []
    if os.path.exists(partial):
        state = torch.load(partial, map_location="cpu", weights_only=False)
        if state["config"] == config:
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            start, seconds, losses = state["step"], state["seconds"], state["losses"]
            log(f"  resuming {size}x{size} seed {seed} at step {start}")
    steps, batch = settings_["steps"], settings_["batch_size"]
    log(f"  training {size}x{size} seed {seed}: {n_parameters(model):,} parameters, {steps} steps of {batch}, "
        f"{torch.get_num_threads()} threads")
    clock, running = time.perf_counter(), []
    for step in range(start, steps):
        lr = settings_["lr"] * min(1.0, (step + 1) / settings_["warmup"]) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x0 = data[torch.randint(len(data), (batch,), generator=gen)]
        sigma = (torch.randn(batch, generator=gen) * P_STD + P_MEAN).exp()
        loss = edm_loss(model, x0, sigma, torch.randn(x0.shape, generator=gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step, settings_["ema"])
        running.append(loss.item())
        if (step + 1) % 250 == 0 or step + 1 == steps:
            losses.append((step + 1, float(np.mean(running))))
            running = []
            elapsed = seconds + time.perf_counter() - clock
            log(f"    step {step + 1}/{steps}: loss {losses[-1][1]:.4f}, {elapsed:.0f} s, load {os.getloadavg()[0]:.2f}")
        if (step + 1) % 1000 == 0 and step + 1 < steps:
            save(partial, dict(config=config, model=model.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                               gen=gen.get_state(), step=step + 1, seconds=seconds + time.perf_counter() - clock,
                               losses=losses))
    seconds += time.perf_counter() - clock
    ema.eval()
    info = dict(seconds=seconds, threads=torch.get_num_threads(), parameters=n_parameters(ema), losses=losses,
                held_out_loss=validation_loss(ema, held_out, size), train_loss=validation_loss(ema, train[:2000], size),
                load=os.getloadavg(), torch=torch.__version__)
    save(path, dict(config=config, ema=ema.state_dict(), sigma_data=ema.sigma_data, info=info))
    if os.path.exists(partial):
        os.unlink(partial)
    log(f"  trained {size}x{size} seed {seed} in {seconds / 60:.1f} min: EDM loss train {info['train_loss']:.4f}, "
        f"held out {info['held_out_loss']:.4f}; saved {path}")
    return ema, info


@torch.no_grad()
@torch.no_grad()
def ema_update(ema, model, step, rate):
    """The exponential moving average of the weights, with a warm-up: ``min(rate, (1 + step) / (10 + step))``."""
    decay = min(rate, (1.0 + step) / (10.0 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def validation_loss(model, x, size, n=2000):
    """EDM's loss on `n` patches at fixed log-normal sigmas and noise (the same for every model)."""
    gen = torch.Generator().manual_seed(7)
    x0 = torch.as_tensor(x[:n], dtype=torch.float32).reshape(-1, 3, size, size)
    sigma = (torch.randn(len(x0), generator=gen) * P_STD + P_MEAN).exp()
    return float(edm_loss(model, x0, sigma, torch.randn(x0.shape, generator=gen)))


def save(path, obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    so.write_atomically(path, buffer.getvalue())


# --------------------------------------------------------------------------------
# The model as the library sees it, and k-diffusion's samplers
# --------------------------------------------------------------------------------

def numpy_denoiser(model, size):
    """D(y, nu) for the library: y (n, d) float64, nu a float or (n,); float32 inside, float64 out."""

    @torch.no_grad()
    def denoiser(y, nu):
        nu = np.array(np.broadcast_to(np.asarray(nu, dtype=np.float64), (len(y),)))
        out = np.empty(y.shape)
        for i in range(0, len(y), BATCH):
            x = torch.as_tensor(y[i:i + BATCH], dtype=torch.float32).reshape(-1, 3, size, size)
            out[i:i + BATCH] = model(x, torch.as_tensor(nu[i:i + BATCH], dtype=torch.float32)).reshape(len(x), -1).double().numpy()
        return out

    return denoiser


class Counted:
    """The model as k-diffusion calls it, counting the calls."""

    def __init__(self, model, dtype=torch.float32):
        self.model, self.calls, self.dtype = model, 0, dtype

    def __call__(self, x, sigma):
        self.calls += 1
        return self.model(x.to(torch.float32), sigma.to(torch.float32)).to(self.dtype)


def numpy_noise(seed, shape):
    """k-diffusion's noise_sampler drawing what `sampler.sample` draws from np.random.default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return lambda sigma, sigma_next: torch.as_tensor(rng.standard_normal((shape[0], int(np.prod(shape[1:])))),
                                                     dtype=torch.float32).reshape(shape)


@torch.no_grad()
def k_sample(model, name, x_T, sigmas, noise_seed=NOISE_SEED, dtype=torch.float32):
    """k-diffusion's sampler `name` on `sigmas` from `x_T`; returns (samples, model calls)."""
    counted = Counted(model, dtype)
    x_T, sigmas = x_T.to(dtype), sigmas.to(dtype)
    extra = {"noise_sampler": numpy_noise(noise_seed, tuple(x_T.shape))} if name == "ancestral" else {}
    x = getattr(sampling, SAMPLERS[name])(counted, x_T, sigmas, disable=True, **extra)
    return x, counted.calls


def export(found, process):
    """k-diffusion sigmas (float32 tensor), the schedule ts (float64, or None) and the evaluations of a rule's result."""
    if isinstance(found, torch.Tensor):
        return found.to(torch.float32), None, 0
    if isinstance(found, so.ScheduleMap):
        return torch.as_tensor(found.sigmas(N_LEVELS, dtype=np.float32)), found.schedule(T), found.n_evaluations
    ts = found.ts if hasattr(found, "ts") else np.asarray(found, dtype=float)
    return torch.as_tensor(so.to_sigmas(process, ts), dtype=torch.float32), ts, getattr(found, "n_evaluations", 0)


def measured(find):
    """find() with its wall seconds, the tracemalloc peak (NumPy and Python allocations; not torch's
    own allocator) and the process's peak resident memory during the call (VmHWM, reset before)."""
    gc.collect()
    rss_before = _reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = find()
        seconds = time.perf_counter() - start
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return out, dict(seconds=seconds, traced_mb=traced / 2 ** 20, rss_mb=_status("VmHWM") / 2 ** 10,
                     rss_before_mb=rss_before / 2 ** 10)


def _status(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return float("nan")


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                  # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass
    return _status("VmRSS")


# --------------------------------------------------------------------------------
# One model: find the schedules, sample, measure
# --------------------------------------------------------------------------------

def evaluate(model, size, seed, train, held_out, cfg, results, log):
    n = min(cfg["n_samples"][size], len(held_out))
    denoiser = numpy_denoiser(model, size)
    ctx = SimpleNamespace(score=so.score_from_denoiser(denoiser, PROCESS), process=PROCESS, sigma_data=model.sigma_data,
                          x0=train[:cfg["n_x0"]].astype(np.float64), rng=RULE_SEED + seed, size=size)
    samplers = cfg["samplers"]

    # The schedules, each rule once per model or once per sampler's step.
    schedules = {}                 # (rule, sampler) -> (sigmas, ts)
    for name in cfg["rules"]:
        rule = RULES[name]
        applies = [s for s in samplers if rule.samplers is None or s in rule.samplers]
        for step in (applies if rule.per_sampler else applies[:1]):
            found, cost = measured(lambda: rule.find(ctx, step))
            sigmas, ts, evaluations = export(found, PROCESS)
            record = dict(size=size, seed=seed, rule=name, sampler=step if rule.per_sampler else "all",
                          evaluations=evaluations, sigmas=sigmas.numpy(), baseline=rule.baseline, **cost,
                          n_iter=getattr(found, "n_iter", None), converged=getattr(found, "converged", None))
            results["found"].append(record)
            results["loads"].append(os.getloadavg()[0])
            if not rule.baseline:
                log(f"  {name:22s} {record['sampler']:9s}: {evaluations:7,} evaluations, {cost['seconds']:6.1f} s, "
                    f"traced peak {cost['traced_mb']:6.1f} MB, peak RSS {cost['rss_mb']:6.0f} MB")
            for s in (applies if not rule.per_sampler else [step]):
                schedules[(name, s)] = (sigmas, ts)

    # One prior draw per model, the model's own 200-level Heun solution from it.
    x_T = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(PRIOR_SEED + seed)) * SIGMA_MAX
    start = time.perf_counter()
    levels = cfg["reference_levels"]
    reference, calls = k_sample(model, "heun", x_T, sampling.get_sigmas_karras(levels, SIGMA_MIN, SIGMA_MAX))
    results["calls"][("reference", levels)] = calls
    reference = reference.reshape(n, -1).double().numpy()
    heldout = held_out[:n].astype(np.float64)
    results["floors"][(size, seed, "reference")] = dict(sliced_w1=sm.sliced_wasserstein(reference, heldout, 0),
                                                       mmd2=sm.mmd2(reference[:cfg["n_mmd"]], heldout[:cfg["n_mmd"]]))
    results["samples"][(size, seed, "reference")] = reference[:16]
    log(f"  reference: {levels}-level Heun, {calls} model calls, {time.perf_counter() - start:.0f} s; "
        f"sliced W1 to held out {results['floors'][(size, seed, 'reference')]['sliced_w1']:.4f}")

    # Every rule with every sampler, from the same prior draw (and the same ancestral noise).
    done = []
    for (name, s), (sigmas, ts) in schedules.items():
        same = next((row for row in done if row["sampler"] == s and len(row["sigmas"]) == len(sigmas)
                     and np.allclose(row["sigmas"], sigmas.numpy(), rtol=1e-6, atol=0)), None)
        if same is not None:                             # equal to float32 rounding (uniform t is log-linear under ve())
            row = dict(same, rule=name, same_as=same["rule"], baseline=RULES[name].baseline)
        else:
            start = time.perf_counter()
            x, calls = k_sample(model, s, x_T, sigmas)
            x = x.reshape(n, -1).double().numpy()
            ok = bool(np.all(np.isfinite(x)))
            row = dict(size=size, seed=seed, rule=name, sampler=s, calls=calls, same_as=None,
                       coupled=float(np.mean((x - reference) ** 2)) if ok and s in DETERMINISTIC else np.nan,
                       sliced_w1=sm.sliced_wasserstein(x, heldout, 0) if ok else np.inf,
                       mmd2=sm.mmd2(x[:cfg["n_mmd"]], heldout[:cfg["n_mmd"]]) if ok else np.inf,
                       seconds=time.perf_counter() - start, baseline=RULES[name].baseline, sigmas=sigmas.numpy())
            results["calls"][(s, N_LEVELS)] = calls
            results["samples"][(size, seed, name, s)] = x[:16]
            done.append(row)
        results["rows"].append(row)
        log(f"  {name:22s} {s:9s}: coupled {row['coupled']:.3e}, sliced W1 {row['sliced_w1']:.4f}, "
            f"MMD^2 {row['mmd2']:.2e}" + (f" (= {row['same_as']})" if row["same_as"] else ""))

    results["agreement"] += agreement(model, ctx, size, seed, x_T[:cfg["n_agreement"]], schedules, samplers, log)


def agreement(model, ctx, size, seed, x_T, schedules, samplers, log):
    """`sampler.sample(score, process, ts, x_T, rng, predictor=..., denoise=True)` against k-diffusion's
    sampler on `to_sigmas(process, ts)` from the same draw: with k-diffusion's float32 state (what a
    user runs) and with a float64 state (the model still float32): the same algorithm to rounding.
    For the ancestral step both draw the same noise (NumPy's, through k-diffusion's noise_sampler)."""
    out = []
    x64 = x_T.reshape(len(x_T), -1).double().numpy()
    for s in samplers:
        found = [(name, ts) for (name, step), (_, ts) in schedules.items() if step == s and ts is not None
                 and RULES[name].per_sampler]
        for label, ts in [("EDM ρ=7 (so.edm_schedule)", so.edm_schedule(PROCESS, T, 7.0))] + found[:1]:
            ours = sm.sample(ctx.score, PROCESS, ts, x64, NOISE_SEED, predictor=s, denoise=True, batch_size=BATCH)
            sigmas = torch.as_tensor(so.to_sigmas(PROCESS, ts))
            theirs32, calls = k_sample(model, s, x_T, sigmas.to(torch.float32))
            theirs64, _ = k_sample(model, s, x_T, sigmas, dtype=torch.float64)
            theirs32 = theirs32.reshape(len(x_T), -1).double().numpy()
            theirs64 = theirs64.reshape(len(x_T), -1).numpy()
            row = dict(size=size, seed=seed, sampler=s, schedule=label, n=len(x_T), nfe_ours=ours.nfe, calls_k=calls,
                       max_diff32=float(np.max(np.abs(ours.x - theirs32))),
                       max_diff64=float(np.max(np.abs(ours.x - theirs64))),
                       scale=float(np.max(np.abs(theirs32))))
            out.append(row)
            log(f"  sampler.sample vs k-diffusion {s:9s} {label}: max |diff| {row['max_diff32']:.2e} (float32 "
                f"state), {row['max_diff64']:.2e} (float64 state), samples up to {row['scale']:.2f}; "
                f"calls {ours.nfe} / {calls}")
    return out


# --------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------

def _fmt(value, spec):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    if isinstance(value, float) and np.isinf(value):
        return "diverged"
    return format(value, spec)


def report(results, cfg):
    rows, found, R = results["rows"], results["found"], cfg["reference_levels"]
    rules = [r for r in cfg["rules"] if any(row["rule"] == r for row in rows)]
    samplers = [s for s in cfg["samplers"] if any(row["sampler"] == s for row in rows)]
    by = {(r["size"], r["seed"], r["rule"], r["sampler"]): r for r in rows}
    load0, load1 = results["load"]
    lines = ["# Schedules for a float32 PyTorch U-Net on RGB image patches, sampled by k-diffusion", "",
             f"Written by `{cfg['command']}` (issue 26, part 1); every number below is from that run: "
             f"{results['seconds'] / 60:.0f} minutes in all on {machine()}, `torch.set_num_threads({cfg['threads']})`, "
             f"OPENBLAS_NUM_THREADS={results.get('blas_threads', 'unset')}"
             + (f", of which {sum(results['trained_now'].values()) / 60:.0f} minutes training the models "
                f"{', '.join(f'{a}x{a} seed {b}' for a, b in results['trained_now'])} (the others were loaded)"
                if results["trained_now"] else " (every model loaded, trained before: below)")
             + f". Load average (1 minute) {load0[0]:.2f} at the start, {load1[0]:.2f} at the end, "
             f"{np.mean(results['loads']):.1f} on average (min {np.min(results['loads']):.1f}, max "
             f"{np.max(results['loads']):.1f}) at the {len(results['loads'])} points sampled: other jobs ran beside it "
             f"on the 2 cores. Versions: {versions()}.", "",
             "## Setup", "",
             f"- **Data**: RGB patches of scikit-image's colour photographs ({', '.join(cfg['photos'])}), in [-1, 1], "
             f"the same number from each: {cfg['n_train']:,} training patches from the left 80% of each photograph "
             f"(windows at stride {STRIDE['train']}), {cfg['n_held_out']:,} held out from the right 20% (stride "
             f"{STRIDE['held_out']}).",
             f"- **Models**: a U-Net on pixel groups (pixel_unshuffle) with EDM's preconditioning (sigma_data from the "
             f"data), k-diffusion's `D(x, sigma)`, float32, EDM's loss with log-normal sigmas "
             f"(P_mean {P_MEAN}, P_std {P_STD}), Adam, EMA weights; per size: " +
             "; ".join(f"{s}x{s} (d = {3 * s * s:,}): channels {cfg['model'][s]['channels']}, patch "
                       f"{cfg['model'][s]['patch']}, {cfg['train'][s]['steps']:,} steps of {cfg['train'][s]['batch_size']}"
                       for s in cfg["sizes"]) + ".",
             f"- **Score**: `so.score_from_denoiser(denoiser, so.ve())`, nu from {SIGMA_MIN} to {SIGMA_MAX:g}; "
             f"`denoiser(y, nu)` a NumPy function around the model (batches of {BATCH}, float32 inside, float64 out).",
             f"- **Schedules**: T = {T} steps, i.e. k-diffusion's n = {N_LEVELS} levels and a final 0. Rules found "
             f"from the model with {cfg['n_x0']:,} training patches as `x0`: the corrector map "
             f"(`estimate_schedule_map(..., budget={BUDGET:,})`, exported by `smap.sigmas({N_LEVELS}, "
             "dtype=np.float32)`, shared by all samplers), `equal_error_schedule(..., step=<sampler>, weight=...)` "
             "and GITS (`teacher_schedule(..., step=<sampler>)`, Euler and Heun only), each for its sampler's step. "
             "Uniform in t is log-linear under `ve()` (geometric sigma), so its sigmas equal k-diffusion's "
             "exponential ones to float32 rounding; its rows are the exponential rows.",
             f"- **Sampling**: k-diffusion's `{'`, `'.join(SAMPLERS[s] for s in samplers)}` on these sigmas (float32), "
             "from one prior draw per model, `randn * 80`, shared by every row (the ancestral rows also share "
             "their noise).",
             f"- **Metrics**: coupled error = mean squared distance per coordinate to the model's own solution from "
             f"the same draw, `sample_heun` on `get_sigmas_karras({R}, 0.002, 80)` (rho = 7, "
             f"{results['calls'].get(('reference', R), '?')} model calls), deterministic samplers "
             "only; sliced W1 (`sm.sliced_wasserstein`, 256 directions) to the held-out patches, "
             + ", ".join(f"{cfg['n_samples'][s]:,} samples at {s}x{s}" for s in cfg["sizes"]) +
             (" (fewer at 32x32 so that the whole run stays within a few hours on this shared 2-core machine; the "
              "sliced W1 of 1,000 samples has a larger finite-sample floor than that of 2,000, so compare the 32x32 "
              "numbers with the 32x32 floors only)" if cfg["n_samples"].get(32, 0) < cfg["n_samples"].get(16, 0)
             and {16, 32} <= set(cfg["sizes"]) else "") +
             f"; MMD^2 (`sm.mmd2`, Gaussian kernel, median bandwidth) on the first {cfg['n_mmd']:,} of them against "
             f"{cfg['n_mmd']:,} held-out patches (scipy's `cdist` makes it O(n^2 d): 33 s for 2,000 against 2,000 at "
             "d = 3,072). Unclipped samples.", ""]
    lines += summary(results, cfg, rules, samplers)
    lines += ["## Models", "", "| size | seed | parameters | training | threads | EDM loss, train | EDM loss, held out |",
              "|---|---|---|---|---|---|---|"]
    for (size, seed), info in results["models"].items():
        lines.append(f"| {size}x{size} | {seed} | {info['parameters']:,} | {info['seconds'] / 60:.1f} min | "
                     f"{info['threads']} | {info['train_loss']:.4f} | {info['held_out_loss']:.4f} |")
    lines += ["", "EDM loss at fixed log-normal sigmas and noise on 2,000 patches (lower is better).", ""]
    for size in [s for s in cfg["sizes"] if (s, "train") in results["floors"]]:
        lines += [f"## {size}x{size} (d = {3 * size * size:,})", ""]
        floor = results["floors"][(size, "train")]
        lines += [f"Floors: training against held-out patches, sliced W1 **{floor['sliced_w1']:.4f}**, MMD^2 "
                  f"{floor['mmd2']:.2e}; the model's own {R}-level solution against held-out patches: " +
                  "; ".join(f"seed {seed} sliced W1 **{results['floors'][(size, seed, 'reference')]['sliced_w1']:.4f}**, "
                            f"MMD^2 {results['floors'][(size, seed, 'reference')]['mmd2']:.2e}"
                            for seed in cfg["seeds"] if (size, seed, "reference") in results["floors"]) + ".", ""]
        for seed in cfg["seeds"]:
            if not any(r["size"] == size and r["seed"] == seed for r in rows):
                continue
            for metric, title, spec, which in (("coupled", "coupled error (to the model's own solution)", ".3e",
                                                [s for s in samplers if s in DETERMINISTIC]),
                                               ("sliced_w1", "sliced W1 to held-out patches", ".4f", samplers),
                                               ("mmd2", "MMD^2 to held-out patches", ".2e", samplers)):
                if not which:
                    continue
                lines += [f"### {size}x{size}, model seed {seed}: {title}", "",
                          "| rule | " + " | ".join(which) + " |", "|---" * (len(which) + 1) + "|"]
                best = {s: min((by[(size, seed, r, s)][metric] for r in rules if (size, seed, r, s) in by), default=None)
                        for s in which}
                for rule in rules:
                    cells = []
                    for s in which:
                        row = by.get((size, seed, rule, s))
                        text = "" if row is None else _fmt(row[metric], spec)
                        cells.append(f"**{text}**" if row is not None and row[metric] == best[s] else text)
                    if any(cells):
                        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
                lines.append("")
        lines += [f"### {size}x{size}: the cost of finding each schedule", "",
                  "Per-sample score evaluations (the result's `n_evaluations`), wall seconds (with tracemalloc "
                  "running), the tracemalloc peak of the call (NumPy and Python allocations; torch's own allocator "
                  "is not traced) and the process's peak resident memory during the call (VmHWM, reset before the "
                  "call; it includes the data and the model already in memory, the RSS before the call in brackets).",
                  "", "| rule | step | seed | evaluations | seconds | traced peak (MB) | peak RSS (MB) | updates |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in found:
            if r["size"] != size or r["baseline"]:
                continue
            lines.append(f"| {r['rule']} | {r['sampler']} | {r['seed']} | {r['evaluations']:,} | {r['seconds']:.1f} | "
                         f"{r['traced_mb']:.1f} | {r['rss_mb']:.0f} ({r['rss_before_mb']:.0f}) | "
                         f"{'' if r['n_iter'] is None else r['n_iter']}"
                         f"{'' if r['converged'] in (None, True) else ' (not converged)'} |")
        lines.append("")
    lines += seed_noise(results, cfg, rules, samplers)
    lines += schedule_table(results, cfg)
    lines += ["## `sampler.sample` against k-diffusion", "",
              "The project's sampler, `sampler.sample(score, process, ts, x_T, rng, predictor=..., denoise=True)` on "
              "the float64 prior draw, against k-diffusion's sampler on `to_sigmas(process, ts)` from the same draw: "
              "with k-diffusion's float32 state and sigmas (what a user runs) and with a float64 state and sigmas (the "
              "model still computes in float32). k-diffusion's last step, from sigma_min to 0, is `denoise=True` "
              "(Tweedie at t_min); its Heun takes an Euler step there (one call), as `heun_step` does when nu' = 0; "
              "DPM-Solver++(2M)'s last step returns the denoiser. The ancestral rows draw the same noise (NumPy's, "
              "through k-diffusion's `noise_sampler`).", "",
              "| size | seed | sampler | schedule | samples | max abs diff, float32 | max abs diff, float64 state | "
              "max abs sample | model calls (ours / k-diffusion) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["agreement"]:
        lines.append(f"| {r['size']} | {r['seed']} | {r['sampler']} | {r['schedule']} | {r['n']} | {r['max_diff32']:.2e} | "
                     f"{r['max_diff64']:.2e} | {r['scale']:.2f} | {r['nfe_ours']} / {r['calls_k']} |")
    lines += ["", "## Model calls", "",
              f"Counted on k-diffusion's samplers, n = {N_LEVELS} levels and a final 0: " +
              ", ".join(f"`{SAMPLERS[s]}` {results['calls'][(s, N_LEVELS)]}" for s in samplers if (s, N_LEVELS) in results["calls"])
              + (" (Heun: 2 per step between levels, 1 for the last step to 0, i.e. 2n - 1)" if "heun" in samplers else "")
              + "; the reference, "
              f"`sample_heun` on {R} levels: {results['calls'].get(('reference', R), '?')}.", ""]
    return "\n".join(lines) + "\n"


def summary(results, cfg, rules, samplers):
    """Each rule's coupled error and sliced W1 over the best baseline of its column, geometric mean over seeds."""
    by = {(r["size"], r["seed"], r["rule"], r["sampler"]): r for r in results["rows"]}
    lines = ["## Summary", "",
             "Each rule's coupled error and sliced W1 divided by the best baseline's in the same column (the best "
             "of the six baselines with that sampler and model, chosen in hindsight), geometric mean over the model "
             "seeds: coupled / W1 (W1 only for the ancestral sampler). Below 1: better than every baseline. The "
             "best baseline by coupled error is named under each table.", ""]
    for size in cfg["sizes"]:
        seeds = [seed for seed in cfg["seeds"] if any(r["size"] == size and r["seed"] == seed for r in results["rows"])]
        if not seeds:
            continue
        lines += [f"**{size}x{size}** (model seeds {', '.join(map(str, seeds))})", "",
                  "| rule | " + " | ".join(samplers) + " |", "|---" * (len(samplers) + 1) + "|"]
        names = {}
        for rule in rules:
            cells = []
            for s in samplers:
                ratios = {"coupled": [], "sliced_w1": []}
                for seed in seeds:
                    bases = [b for b in rules if RULES[b].baseline and (size, seed, b, s) in by]
                    if (size, seed, rule, s) not in by or not bases:
                        continue
                    for metric in ratios:
                        best = min(bases, key=lambda b: by[(size, seed, b, s)][metric])
                        if metric == "coupled":
                            names.setdefault(s, set()).add(best)
                        ratios[metric].append(by[(size, seed, rule, s)][metric] / by[(size, seed, best, s)][metric])
                geo = {m: float(np.exp(np.mean(np.log(v)))) if v and np.all(np.isfinite(v)) and np.all(np.array(v) > 0)
                       else None for m, v in ratios.items()}
                if geo["sliced_w1"] is None:
                    cells.append("")
                elif s in DETERMINISTIC and geo["coupled"] is not None:
                    cells.append(f"{geo['coupled']:.2f} / {geo['sliced_w1']:.3f}")
                else:
                    cells.append(f"— / {geo['sliced_w1']:.3f}")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines += ["", "Best baseline by coupled error: " + "; ".join(f"{s}: {', '.join(sorted(names[s]))}"
                                                                   for s in samplers if s in names and s in DETERMINISTIC)
                  + ".", ""]
    return lines


def schedule_table(results, cfg):
    """The sigmas of every schedule found (k-diffusion's convention, the final 0 left out), for reuse."""
    lines = ["## The schedules", "", f"k-diffusion's sigmas (n = {N_LEVELS} levels; the final 0 left out), as used "
             "above, float32.", "", "| size | seed | rule | step | sigmas |", "|---|---|---|---|---|"]
    for r in results["found"]:
        lines.append(f"| {r['size']} | {r['seed']} | {r['rule']} | {r['sampler']} | "
                     + ", ".join(f"{v:.4g}" for v in r["sigmas"][:-1]) + " |")
    return lines + [""]


def seed_noise(results, cfg, rules, samplers):
    """Which differences from the best baseline are within the difference between the two model seeds."""
    seeds = cfg["seeds"]
    if len(seeds) < 2:
        return ["## Seed noise", "", "One model seed only: no seed-to-seed comparison.", ""]
    s0, s1 = seeds[:2]
    by = {(r["size"], r["seed"], r["rule"], r["sampler"]): r for r in results["rows"]}
    lines = ["## Seed noise", "",
             f"Each rule against the best baseline of its column (best on the mean of seeds {s0} and {s1}). The "
             "difference is counted only if it has the same sign with both model seeds **and** is larger, with each "
             "seed, than the rule's own seed-to-seed difference |m(seed 0) − m(seed 1)| (the two models differ; each "
             "row shares its prior draw with the other rows of its model, so differences between rows are paired, "
             "differences between seeds are not). `better`/`worse`: resolved; `≈`: within seed noise. Cells: "
             "ratio to the best baseline, seed 0 / seed 1.", ""]
    for size in cfg["sizes"]:
        if not all(any(r["size"] == size and r["seed"] == seed for r in results["rows"]) for seed in (s0, s1)):
            lines += [f"**{size}x{size}**: one model seed only, no seed-to-seed comparison.", ""]
            continue
        for metric, which in (("coupled", [s for s in samplers if s in DETERMINISTIC]), ("sliced_w1", samplers)):
            if not which:
                continue
            lines += [f"**{size}x{size}, {'coupled error' if metric == 'coupled' else 'sliced W1'}**", "",
                      "| rule | " + " | ".join(which) + " |", "|---" * (len(which) + 1) + "|"]
            for rule in rules:
                cells = []
                for s in which:
                    keys = [(size, seed, rule, s) for seed in (s0, s1)]
                    bases = [b for b in rules if RULES[b].baseline and all((size, seed, b, s) in by for seed in (s0, s1))]
                    if not all(k in by for k in keys) or not bases:
                        cells.append("")
                        continue
                    best = min(bases, key=lambda b: by[(size, s0, b, s)][metric] + by[(size, s1, b, s)][metric])
                    v = np.array([by[k][metric] for k in keys])
                    ref = np.array([by[(size, seed, best, s)][metric] for seed in (s0, s1)])
                    if rule == best:
                        cells.append(f"best baseline ({v[0]:.3g} / {v[1]:.3g})")
                        continue
                    delta, spread = v - ref, abs(v[0] - v[1])
                    resolved = np.sign(delta[0]) == np.sign(delta[1]) and np.all(np.abs(delta) > spread)
                    verdict = ("better" if delta[0] < 0 else "worse") if resolved else "≈"
                    cells.append(f"{verdict} ({v[0] / ref[0]:.2f} / {v[1] / ref[1]:.2f})")
                lines.append(f"| {rule} | " + " | ".join(cells) + " |")
            lines.append("")
    return lines


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), {platform.system()}"


def versions():
    import importlib.metadata as meta
    names = ("torch", "k-diffusion", "numpy", "scipy", "scikit-image")
    out = []
    for name in names:
        try:
            out.append(f"{name} {meta.version(name)}")
        except meta.PackageNotFoundError:
            pass
    return ", ".join(out)


def figures(results, cfg, path, log):
    """Per size (model seed 0): the schedules as nu against step, one panel per sampler (the baselines
    thin, the rules found for that sampler thick), and 16 samples of each rule with one sampler."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no figure (pip install matplotlib)")
        return []
    seed = cfg["seeds"][0]
    sizes = [s for s in cfg["sizes"] if any(r["size"] == s and r["seed"] == seed for r in results["found"])]
    if not sizes:
        return []
    samplers = list(cfg["samplers"])
    grid_sampler = "heun" if "heun" in samplers else samplers[0]
    colours = rule_colours()
    n_tiles = len(cfg["rules"]) + 2
    fig = plt.figure(figsize=(max(16, 1.7 * n_tiles), 6.8 * len(sizes)))
    outer = fig.add_gridspec(2 * len(sizes), 1, height_ratios=[2.6, 1.3] * len(sizes), hspace=0.3)
    for k, size in enumerate(sizes):
        found = [r for r in results["found"] if r["size"] == size and r["seed"] == seed]
        panels = outer[2 * k].subgridspec(1, len(samplers), wspace=0.05)
        first = None
        for j, s in enumerate(samplers):
            ax = fig.add_subplot(panels[j], sharey=first)
            first = first or ax
            drawn = []
            for r in found:
                if r["sampler"] not in ("all", s):
                    continue
                nu = r["sigmas"][:-1]
                same = next((q["rule"] for q in drawn if np.allclose(q["sigmas"], r["sigmas"], rtol=1e-6, atol=0)), None)
                label = r["rule"] + (f" (= {same})" if same else "")
                if r["baseline"]:
                    ax.semilogy(np.arange(len(nu)), nu, "--" if same else "-", marker=".", ms=4, lw=1.0,
                                color=colours[r["rule"]], alpha=0.75, label=label)
                else:
                    ax.semilogy(np.arange(len(nu)), nu, "-", marker="o", ms=4, lw=2.2, color=colours[r["rule"]],
                                label=label)
                drawn.append(r)
            ax.set_title(f"{size}x{size}: {SAMPLERS[s]}", fontsize=9)
            ax.set_xlabel("i in sigmas[i] (the final 0 not shown)", fontsize=8)
            if j == 0:
                ax.set_ylabel(r"noise level $\nu$ = sigma", fontsize=9)
            else:
                ax.tick_params(labelleft=False)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
            if j == len(samplers) - 1 or len(samplers) == 1:
                handles = {}
                for a in fig.axes[-len(samplers) if len(samplers) > 1 else -1:]:
                    for h, l in zip(*a.get_legend_handles_labels()):
                        handles.setdefault(l, h)
                ax.legend(handles.values(), handles.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                          title="thin: baselines; thick: found\nfor this sampler (map: for all)", title_fontsize=7)
        inner = outer[2 * k + 1].subgridspec(1, n_tiles, wspace=0.06)
        tiles = [("training patches", results["samples"][(size, "data")]),
                 (f"{cfg['reference_levels']}-level Heun", results["samples"][(size, seed, "reference")])]
        for rule in cfg["rules"]:
            row = next((r for r in results["rows"] if (r["size"], r["seed"], r["rule"], r["sampler"]) ==
                        (size, seed, rule, grid_sampler)), None)
            if row is not None:
                key = (size, seed, row.get("same_as") or rule, grid_sampler)
                tiles.append((rule, results["samples"][key]))
        for j, (title, x) in enumerate(tiles):
            ax = fig.add_subplot(inner[j])
            ax.imshow(tile(x[:16], size))
            ax.set_title(title.replace(" (", "\n("), fontsize=7)
            ax.axis("off")
            if j == 0:
                ax.text(-0.12, 0.5, f"{size}x{size}\n{grid_sampler}\nT = {T}", transform=ax.transAxes, ha="right",
                        va="center", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=130, bbox_inches="tight", format="png")
    plt.close(fig)
    so.write_atomically(path, buffer.getvalue())
    log(f"figure: {os.path.abspath(path)}")
    return [path]


def rule_colours():
    """A distinct colour for every rule in RULES (tab10, then darker ones)."""
    import matplotlib.pyplot as plt
    palette = list(plt.cm.tab10.colors) + ["black", "navy", "darkgoldenrod", "darkslategray", "indigo"]
    return {rule: palette[i % len(palette)] for i, rule in enumerate(RULES)}


def tile(x, size, per_row=4):
    """16 patches (rows of d, channel-first) as one 4x4 RGB image in [0, 1]."""
    images = np.clip((x.reshape(-1, 3, size, size).transpose(0, 2, 3, 1) + 1) / 2, 0, 1)
    images = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=1.0)
    rows = [np.hstack(list(images[i:i + per_row])) for i in range(0, len(images), per_row)]
    return np.vstack(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
