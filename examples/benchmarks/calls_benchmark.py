"""Benchmark: the schedule for n model calls, run through each consumer's own sampler, on three model families.
Writes docs/reports/calls.md (issue 29, part 5).

What a user counts is model calls (NFE), and what a user runs is their framework's own scheduler with its
own default spacing. For n = 4, 6, 8 and 10 calls, every schedule below is run through the consumer's own
sampler with exactly n model calls (counted by wrapping the model), from the same prior noise:

(a) ve: image_benchmark.py's U-Net with EDM's preconditioning on 16x16 RGB patches (its data, model and
    training code, imported), sampled by k-diffusion's sample_euler, sample_heun and sample_dpmpp_2m on
    sigmas. Consumer defaults: get_sigmas_karras(n, 0.002, 80, rho=7) and get_sigmas_exponential.
    Heun with m levels makes 2m - 1 calls, so at a budget of n calls (n even) it runs m = n / 2 levels,
    n - 1 calls: the most Heun can do within n.
(b) ddpm: an epsilon-prediction MLP trained as diffusers' docs train one (DDPMScheduler(1000), linear betas,
    add_noise, MSE on epsilon, integer timesteps) on 8x8 RGB patches (d = 192), sampled by diffusers'
    DPMSolverMultistepScheduler (2M, default settings), DDIMScheduler and EulerDiscreteScheduler.
    Consumer defaults: timestep_spacing "leading", "trailing", "linspace", and use_karras_sigmas=True where
    the scheduler has it. DDIMScheduler takes no custom timesteps: a schedule is run as DDIM through
    DPMSolverMultistepScheduler(solver_order=1, timesteps=...), which reproduces DDIMScheduler on its own
    "leading" and "trailing" timesteps (checked by the run, and reported).
(c) flow: a rectified-flow velocity MLP trained as SD3 is (x_t = (1 - t) x0 + t eps, u = eps - x0,
    logit-normal t) on the same patches, sampled by FlowMatchEulerDiscreteScheduler(shift=3.0). Consumer
    default: its own set_timesteps(n).

Rows: the consumer's defaults; the library's baselines (scoreopt.baseline_schedules(process, n) has n + 1
levels ending at t_min; its top n are the n call levels: the model is not called at t_min, and the
sampler's last step goes to sigma = 0 from the lowest of them); the paper's map (estimate_schedule_map,
its schedule(n) likewise less t_min); today's equal local-error rule (equal_error_schedule, T = n, less
t_min); and the rows of RULES that call the API of issue 29 when it exists (sampler.equal_error_calls,
sampler.recommended_schedule), skipped with a note otherwise. A schedule `ts` of n call levels goes to
the consumer verbatim: k-diffusion and diffusers' Euler take sigmas nu(ts) descending then 0; diffusers'
DPMSolverMultistep takes timesteps round(t (N - 1)) descending; FlowMatchEuler takes sigmas t descending,
pre-unshifted by t / (shift - (shift - 1) t) since diffusers applies its shift to custom sigmas too (the
top level at t_max is sent as t = 1, where the prior is).

Metrics: the coupled error (mean squared distance per coordinate to the model's own fine solution from the
same prior draw; the fine solution's convergence is checked against one at half the resolution), its
standard error over the draws, ratios to the consumer's best default and to the library's best baseline
(paired over draws), sliced W1 to held-out patches, and the model evaluations spent finding the schedule.

    python examples/benchmarks/calls_benchmark.py --cache /work/cache/calls     # trains 3 models or reuses them
    python examples/benchmarks/calls_benchmark.py --quick                       # a smoke run; does not write docs/
    python examples/benchmarks/calls_benchmark.py --train-only --families ddpm  # one model
"""
import argparse
import math
import os
import platform
import sys
import time
from types import SimpleNamespace

import numpy as np

import sampler as sm
import scoreopt as so

try:
    import torch
    import diffusers
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           FlowMatchEulerDiscreteScheduler)
    from k_diffusion import sampling
    import skimage.data  # noqa: F401  (image_benchmark's data)
except Exception as err:           # ImportError, or k-diffusion's own imports failing (pkg_resources, torchvision)
    sys.exit(f"this benchmark needs PyTorch, diffusers, k-diffusion and scikit-image ({type(err).__name__}: {err}): "
             "pip install -e '.[image]' diffusers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image_benchmark as ib      # noqa: E402  (the VE U-Net, its data and training)

diffusers.utils.logging.set_verbosity_error()

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
REPORT = os.path.join(ROOT, "docs", "reports", "calls.md")
CACHE = os.path.join(ROOT, "out", "calls_benchmark")

CALLS = (4, 6, 8, 10)                 # model calls per sample
FAMILIES = ("ddpm", "flow", "ve")
N_SAMPLES = 512                       # prior draws per cell (the same draws for every row)
N_X0 = 2000                           # training rows given to the library's rules
MAP_BUDGET = 50_000                   # the paper's map: per-sample score evaluations
RULE_BUDGET = 20_000                  # today's equal-error rule, per (sampler, n)
THREADS = 1
PRIOR_SEED, RULE_SEED, TRAIN_SEED = 100, 300, 0

# The data: image_benchmark's patches (left 80% of each photograph to train, right 20% held out), [-1, 1].
PATCH = dict(ddpm=8, flow=8, ve=16)
N_TRAIN, N_HELD_OUT = 28_000, 2_800
# The models and their training (CPU, one thread, shared machine: about 4, 4 and 6 minutes here).
MLP_SIZE = dict(width=512, depth=4, emb=64)
TRAIN = dict(ddpm=dict(steps=4000, batch_size=256, lr=1e-3, ema=0.999),
             flow=dict(steps=4000, batch_size=256, lr=1e-3, ema=0.999),
             ve=dict(steps=1200, batch_size=96, lr=2e-3, warmup=100, ema=0.998))
VE_MODEL = dict(channels=(24, 48), patch=2, emb=48)
N_TRAIN_TIMESTEPS = 1000              # diffusers' DDPMScheduler default (linear betas 1e-4 .. 0.02)
FLOW_SHIFT = 3.0                      # SD3's shift, at sampling
REFERENCE = dict(ve=200, ddpm=1000, flow=1000)     # the fine solution's resolution (checked against half of it)

QUICK = dict(calls=(4, 6), n_samples=64, n_x0=300, n_train=4000, n_held_out=600, map_budget=4000,
             rule_budget=2000, reference=dict(ve=40, ddpm=200, flow=200), prefix="quick_",
             train=dict(ddpm=dict(TRAIN["ddpm"], steps=300), flow=dict(TRAIN["flow"], steps=300),
                        ve=dict(TRAIN["ve"], steps=100, warmup=20)))


# --------------------------------------------------------------------------------
# The library's schedules. Each maps (score, process, n, x0, sampler) to n increasing call levels `ts`
# (the model is called at each; the sampler's last step goes from ts[0] to sigma = 0), or to a result with
# `.ts` and `.n_evaluations`. `sampler` is the library's step ("euler", "heun", "dpmpp_2m"); for Heun the
# model is called 2n - 1 times. A rule returns None where it does not exist yet (the row is skipped).
# --------------------------------------------------------------------------------

def top_levels(ts):
    """The top n of an (n + 1)-level schedule: the call levels, t_min dropped."""
    return np.asarray(ts, dtype=float)[1:]


def library_baseline(name):
    return lambda score, process, n, x0, step: top_levels(so.baseline_schedules(process, n, float(x0.std()))[name])


def equal_error_today(score, process, n, x0, step):
    """sampler.equal_error_schedule for T = n steps, less t_min."""
    found = sm.equal_error_schedule(score, process, n, x0, RULE_SEED, step=step, budget=RULE_BUDGET_NOW[0])
    return SimpleNamespace(ts=top_levels(found.ts), n_evaluations=found.n_evaluations)


def issue29(name):
    """The call of issue 29 `sampler.<name>(score, process, n_calls, x0, rng, sampler=step)`, when it exists."""
    def find(score, process, n, x0, step):
        rule = getattr(sm, name, None)
        return None if rule is None else rule(score, process, model_calls(step, n), x0, RULE_SEED, sampler=step)
    return find


RULE_BUDGET_NOW = [RULE_BUDGET]       # today's rule's budget, lowered by --quick
BASELINES = ("uniform", "cosine", "loglinear", "arctan", "edm3", "edm7", "edm100")
RULES = {**{f"lib {name}": library_baseline(name) for name in BASELINES},
         "paper's map": None,         # estimated once per model (map_levels below), its schedule(n) less t_min
         "equal error (today)": equal_error_today,
         "rule (n calls)": issue29("equal_error_calls"),
         "recommended": issue29("recommended_schedule")}


def model_calls(step, n):
    """Model calls of the library's `step` on n call levels (k-diffusion's count: Heun's last step is Euler)."""
    return 2 * n - 1 if step == "heun" else n


# --------------------------------------------------------------------------------
# The models: an MLP with a sinusoidal timestep embedding for (b) and (c); image_benchmark's U-Net for (a)
# --------------------------------------------------------------------------------

def timestep_embedding(timestep, dim, max_period=10_000.0):
    """DDPM's sinusoidal embedding (Ho et al. 2020, from the Transformer) of float timesteps (n,) -> (n, dim)."""
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
    args = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([args.cos(), args.sin()], dim=1)


class MLP(torch.nn.Module):
    """`net(x, timestep)` on flat patches (n, d): [x, embedding(timestep)] through `depth` SiLU layers."""

    def __init__(self, d, width, depth, emb):
        super().__init__()
        self.emb = emb
        layers, size = [], d + emb
        for _ in range(depth):
            layers += [torch.nn.Linear(size, width), torch.nn.SiLU()]
            size = width
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(width, d))

    def forward(self, x, timestep):
        timestep = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(len(x))
        return self.net(torch.cat([x.reshape(len(x), -1), timestep_embedding(timestep, self.emb)], 1)).reshape(x.shape)


def ddpm_loss(model, scheduler, x0, gen):
    """diffusers' training recipe: integer timesteps, `add_noise`, MSE on epsilon."""
    noise = torch.randn(x0.shape, generator=gen)
    k = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    return torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, k), k), noise)


def flow_loss(model, x0, gen):
    """SD3's recipe (Esser et al. 2024): logit-normal t, x_t = (1 - t) x0 + t eps, target u = eps - x0; the
    model sees diffusers' timestep 1000 t."""
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.sigmoid(torch.randn(len(x0), generator=gen))[:, None]
    return torch.nn.functional.mse_loss(model((1 - t) * x0 + t * noise, 1000 * t[:, 0]), noise - x0)


def train_mlp(family, train, cfg, log):
    """Adam with a cosine decay and an EMA of the weights; returns (EMA model, info)."""
    settings_, gen = cfg["train"][family], torch.Generator().manual_seed(TRAIN_SEED)
    torch.manual_seed(TRAIN_SEED)
    model = MLP(train.shape[1], **MLP_SIZE)
    ema = MLP(train.shape[1], **MLP_SIZE).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=settings_["lr"])
    data = torch.from_numpy(np.ascontiguousarray(train, dtype=np.float32))
    scheduler = DDPMScheduler(num_train_timesteps=N_TRAIN_TIMESTEPS)
    steps, start, losses, running = settings_["steps"], time.perf_counter(), [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = settings_["lr"] * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        x0 = data[torch.randint(len(data), (settings_["batch_size"],), generator=gen)]
        loss = ddpm_loss(model, scheduler, x0, gen) if family == "ddpm" else flow_loss(model, x0, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        decay = min(settings_["ema"], (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        running.append(loss.item())
        if (step + 1) % 500 == 0 or step + 1 == steps:
            losses.append((step + 1, float(np.mean(running))))
            running = []
            log(f"    {family} step {step + 1}/{steps}: loss {losses[-1][1]:.4f}, {time.perf_counter() - start:.0f} s")
    return ema.eval(), dict(seconds=time.perf_counter() - start, losses=losses, threads=torch.get_num_threads(),
                            parameters=ib.n_parameters(ema), load=os.getloadavg(), torch=torch.__version__)


def cached_model(family, cfg, log, train_if_missing=True):
    """The trained model of `family` from cfg['cache'], or trained now and saved there; with its data."""
    size = PATCH[family]
    train, held_out = ib.patches(size, cfg["n_train"], cfg["n_held_out"], ib.PHOTOS)
    path = os.path.join(cfg["cache"], f"{cfg['prefix']}{family}.pt")
    if family == "ve":
        ve_cfg = dict(model={size: cfg["ve_model"]}, train={size: cfg["train"]["ve"]}, photos=ib.PHOTOS)
        if not train_if_missing and not os.path.exists(path):
            raise FileNotFoundError(f"no trained model at {path}: run calls_benchmark.py --train-only")
        model, info = ib.trained_model(size, TRAIN_SEED, train, held_out, ve_cfg, path, log)
        return model, info, train, held_out
    config = dict(family=family, mlp=MLP_SIZE, train=cfg["train"][family], n_train=len(train), patch=size)
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["config"] == config:
            model = MLP(train.shape[1], **MLP_SIZE)
            model.load_state_dict(saved["ema"])
            log(f"  {family}: loaded {path} (trained {saved['info']['seconds'] / 60:.1f} min)")
            return model.eval(), saved["info"], train, held_out
        log(f"  {path} was trained with other settings: training again")
    if not train_if_missing:
        raise FileNotFoundError(f"no trained {family} model with these settings at {path}")
    log(f"  training {family} on {len(train)} patches of {size}x{size}, {torch.get_num_threads()} threads")
    model, info = train_mlp(family, train, cfg, log)
    os.makedirs(cfg["cache"], exist_ok=True)
    ib.save(path, dict(config=config, ema=model.state_dict(), info=info))
    log(f"  trained {family} in {info['seconds'] / 60:.1f} min; saved {path}")
    return model, dict(info, trained_now=True), train, held_out


# --------------------------------------------------------------------------------
# The families as the library sees them and as their consumers sample them
# --------------------------------------------------------------------------------

class Counted:
    """The model as a sampler calls it, counting the calls."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, timestep):
        self.calls += 1
        return self.model(x, timestep)


def numpy_model(net, to_timestep, batch=1024):
    """model(x, t) for the library: x (n, d) float64, t a float or (n,); the net in float32 at to_timestep(t)."""

    @torch.no_grad()
    def model(x, t):
        t = np.array(np.broadcast_to(np.asarray(t, dtype=np.float64), (len(x),)))
        out = np.empty(x.shape)
        for i in range(0, len(x), batch):
            xi = torch.as_tensor(x[i:i + batch], dtype=torch.float32)
            out[i:i + batch] = net(xi, torch.as_tensor(to_timestep(t[i:i + batch]), dtype=torch.float32)).double().numpy()
        return out

    return model


def load_ddpm(cache=CACHE, quick=False):
    """The cached DDPM epsilon-model (b) as the library and diffusers see it: `.net(x, timestep)` (torch, x
    (n, 192) in [-1, 1] scale, timestep 0..999), `.scheduler` (DDPMScheduler(1000)), `.process`
    (so.process_from_alphas_cumprod), `.eps_model(x, t)` (NumPy, t in [0, 1] -> timestep t (N - 1)),
    `.score` (so.score_from_eps), `.train`, `.held_out` (patches (n, 192)), `.info`."""
    cfg = settings(["--cache", cache] + (["--quick"] if quick else []))
    return family_context("ddpm", cfg, print, train_if_missing=False)


def load_flow(cache=CACHE, quick=False):
    """The cached rectified-flow velocity model (c): `.net(x, timestep)` (timestep = 1000 t), `.process`
    (so.flow_matching()), `.flow_model(x, t)` (NumPy), `.score` (so.score_from_flow), data and info."""
    cfg = settings(["--cache", cache] + (["--quick"] if quick else []))
    return family_context("flow", cfg, print, train_if_missing=False)


def load_ve(cache=CACHE, quick=False):
    """The cached VE U-Net denoiser (a): `.net(x, sigma)` (k-diffusion's D(x, sigma), x (n, 3, 16, 16)),
    `.process` (so.ve()), `.denoiser(y, nu)` (NumPy), `.score` (so.score_from_denoiser), data and info."""
    cfg = settings(["--cache", cache] + (["--quick"] if quick else []))
    return family_context("ve", cfg, print, train_if_missing=False)


def family_context(family, cfg, log, train_if_missing=True):
    net, info, train, held_out = cached_model(family, cfg, log, train_if_missing)
    ctx = SimpleNamespace(family=family, net=net, info=info, train=train, held_out=held_out)
    if family == "ddpm":
        ctx.scheduler = DDPMScheduler(num_train_timesteps=N_TRAIN_TIMESTEPS)
        ctx.process = so.process_from_alphas_cumprod(ctx.scheduler.alphas_cumprod.numpy())
        ctx.eps_model = numpy_model(net, lambda t: t * (N_TRAIN_TIMESTEPS - 1))
        ctx.score = so.score_from_eps(ctx.eps_model, ctx.process)
    elif family == "flow":
        ctx.process = so.flow_matching()
        ctx.flow_model = numpy_model(net, lambda t: 1000.0 * t)
        ctx.score = so.score_from_flow(ctx.flow_model, ctx.process)
    else:
        ctx.process = ib.PROCESS
        ctx.denoiser = ib.numpy_denoiser(net, PATCH["ve"])
        ctx.score = so.score_from_denoiser(ctx.denoiser, ctx.process)
    return ctx


# --------------------------------------------------------------------------------
# Settings and the run
# --------------------------------------------------------------------------------

def settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny models); does not write docs/reports/")
    parser.add_argument("--cache", default=CACHE, help="folder for the trained models and the run's results")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, help="model families (default: ddpm flow ve)")
    parser.add_argument("--calls", type=int, nargs="+", help="model calls per sample (default: 4 6 8 10)")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the models and stop")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    args = parser.parse_args(argv)
    cfg = dict(calls=CALLS, families=FAMILIES, n_samples=N_SAMPLES, n_x0=N_X0, n_train=N_TRAIN,
               n_held_out=N_HELD_OUT, map_budget=MAP_BUDGET, rule_budget=RULE_BUDGET, reference=dict(REFERENCE),
               train=dict(TRAIN), ve_model=VE_MODEL, prefix="", cache=args.cache, threads=args.threads,
               train_only=args.train_only, quick=args.quick, write_docs=not (args.quick or args.train_only),
               command="python examples/benchmarks/calls_benchmark.py" + "".join(f" {a}" for a in (argv or [])))
    if args.quick:
        cfg.update(QUICK)
    if args.families:
        cfg["families"] = tuple(args.families)
    if args.calls:
        cfg["calls"] = tuple(args.calls)
    return cfg


def main(argv=None, log=print):
    return run(settings(argv), log)


def run(cfg, log=print):
    torch.set_num_threads(cfg["threads"])
    os.makedirs(cfg["cache"], exist_ok=True)
    results = dict(cfg=cfg, families={}, begin=time.time(), load=[os.getloadavg()])
    for family in cfg["families"]:
        ctx = family_context(family, cfg, log)
        results["families"][family] = dict(info=ctx.info)
        if cfg["train_only"]:
            continue
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
