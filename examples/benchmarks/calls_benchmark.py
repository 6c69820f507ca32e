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
(b) ddpm: an epsilon-prediction MLP (with a skip through the table: EpsNet) trained as diffusers' docs
    train one (DDPMScheduler(1000), linear betas, add_noise, MSE on epsilon, integer timesteps) on 8x8 RGB
    patches (d = 192), sampled by diffusers' DPMSolverMultistepScheduler (2M, default settings),
    DDIMScheduler (clip_sample=False: the ODE) and EulerDiscreteScheduler.
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
    python examples/benchmarks/calls_benchmark.py --report-only                 # the report again from results.pkl

The trained models load with load_ve, load_ddpm and load_flow (below), e.g. to diagnose the library's rules.
"""
import argparse
import math
import os
import pickle
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
FAMILIES = ("ve", "ddpm", "flow")
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
             rule_budget=6000, reference=dict(ve=40, ddpm=200, flow=200), prefix="quick_",
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


_BASELINES = {}                       # (process, n, c) -> so.baseline_schedules(...): all seven made at once


def library_baseline(name):
    def find(score, process, n, x0, step):
        key = (process.name, n, float(x0.std()))
        if key not in _BASELINES:
            _BASELINES[key] = so.baseline_schedules(process, n, key[2])
        return top_levels(_BASELINES[key][name])
    return find


def equal_error_today(score, process, n, x0, step):
    """sampler.equal_error_schedule for T = n steps, less t_min."""
    found = sm.equal_error_schedule(score, process, n, x0, RULE_SEED, step=step, budget=RULE_BUDGET_NOW[0])
    return SimpleNamespace(ts=top_levels(found.ts), n_evaluations=found.n_evaluations)


def rule_for_calls(score, process, n, x0, step):
    """sampler.equal_error_calls: the equal local-error rule on the levels of n calls."""
    return sm.equal_error_calls(score, process, model_calls(step, n), x0, RULE_SEED, step=step)


def recommended(score, process, n, x0, step):
    """sampler.recommended_schedule: the rule, the consumers' defaults and the baselines, checked against the
    model's own solution (flow matching: the scheduler's shift, 3)."""
    shift = FLOW_SHIFT if process.name.startswith("flow_matching") else None
    return sm.recommended_schedule(score, process, model_calls(step, n), x0, RULE_SEED, step=step, shift=shift)


RULE_BUDGET_NOW = [RULE_BUDGET]       # today's rule's budget, lowered by --quick
BASELINES = ("uniform", "cosine", "loglinear", "arctan", "edm3", "edm7", "edm100")
RULES = {**{f"lib {name}": library_baseline(name) for name in BASELINES},
         "paper's map": None,         # estimated once per model (map_levels below), its schedule(n) less t_min
         "equal error (today)": equal_error_today,
         "rule (n calls)": rule_for_calls,
         "recommended": recommended}


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


class EpsNet(torch.nn.Module):
    """The epsilon-model of (b): eps(x, k) = sigma_k x + alpha_k F(x, k), F an MLP, alpha_k = sqrt(abar_k) and
    sigma_k = sqrt(1 - abar_k) from the DDPMScheduler's table (linear between integer timesteps).

    The skip is what lets an MLP reach the identity that epsilon is at high noise to the accuracy the ODE
    needs: the ODE carries an error e of epsilon into the sample as about nu e, and nu reaches 157 at
    timestep 999. Trained bare (the same MLP, recipe and steps), the model's own 1000-step solution had a
    sliced W1 of 7.2 to held-out patches (the training data's: 0.10): a model no user would keep."""

    def __init__(self, d, alphas_cumprod, **mlp):
        super().__init__()
        self.mlp = MLP(d, **mlp)
        self.register_buffer("alpha", alphas_cumprod.sqrt().float())
        self.register_buffer("sigma", (1 - alphas_cumprod).sqrt().float())

    def forward(self, x, timestep):
        k = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(len(x)).clamp(0, len(self.alpha) - 1)
        lo = k.floor().long().clamp(max=len(self.alpha) - 2)
        w = (k - lo)[:, None]
        alpha = (1 - w) * self.alpha[lo][:, None] + w * self.alpha[lo + 1][:, None]
        sigma = (1 - w) * self.sigma[lo][:, None] + w * self.sigma[lo + 1][:, None]
        flat = x.reshape(len(x), -1)
        return (sigma * flat + alpha * self.mlp(flat, k)).reshape(x.shape)


def make_net(family, d, cfg):
    if family == "ddpm":
        return EpsNet(d, DDPMScheduler(num_train_timesteps=N_TRAIN_TIMESTEPS).alphas_cumprod, **cfg["mlp"])
    return MLP(d, **cfg["mlp"])


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
    model = make_net(family, train.shape[1], cfg)
    ema = make_net(family, train.shape[1], cfg).requires_grad_(False)
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
        ib.ema_update(ema, model, step, settings_["ema"])
        running.append(loss.item())
        if (step + 1) % 500 == 0 or step + 1 == steps:
            losses.append((step + 1, float(np.mean(running))))
            running = []
            log(f"    {family} step {step + 1}/{steps}: loss {losses[-1][1]:.4f}, {time.perf_counter() - start:.0f} s")
    return ema.eval(), dict(seconds=time.perf_counter() - start, losses=losses, threads=torch.get_num_threads(),
                            parameters=ib.n_parameters(ema), load=os.getloadavg(), torch=torch.__version__)


def cached_model(family, cfg, log, train_if_missing=True):
    """The trained model of `family` from cfg['cache'], or trained now and saved there; with its data."""
    size = cfg["patch"][family]
    train, held_out = ib.patches(size, cfg["n_train"], cfg["n_held_out"], ib.PHOTOS)
    path = os.path.join(cfg["cache"], f"{cfg['prefix']}{family}.pt")
    if family == "ve":
        ve_cfg = dict(model={size: cfg["ve_model"]}, train={size: cfg["train"]["ve"]}, photos=ib.PHOTOS)
        if not train_if_missing and not os.path.exists(path):
            raise FileNotFoundError(f"no trained model at {path}: run calls_benchmark.py --train-only")
        model, info = ib.trained_model(size, TRAIN_SEED, train, held_out, ve_cfg, path, log)
        return model, info, train, held_out
    config = dict(family=family, mlp=cfg["mlp"], train=cfg["train"][family], n_train=len(train), patch=size,
                  **({"net": "EpsNet"} if family == "ddpm" else {}))
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved["config"] == config:
            model = make_net(family, train.shape[1], cfg)
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
            k = torch.as_tensor(to_timestep(t[i:i + batch]), dtype=torch.float32)
            out[i:i + batch] = net(xi, k).double().numpy()
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
        ctx.denoiser = ib.numpy_denoiser(net, cfg["patch"]["ve"])
        ctx.score = so.score_from_denoiser(ctx.denoiser, ctx.process)
    return ctx



# --------------------------------------------------------------------------------
# The consumers' samplers. Each sampler of a family: the library's `step` for its rules, `levels(n_calls)`
# (call levels within n calls), `run(ts, x_T)` (a library schedule through the consumer) and its
# `defaults` {name: run(m, x_T)} (the consumer's own spacings for m levels). Every run returns
# (samples, model calls).
# --------------------------------------------------------------------------------

@torch.no_grad()
def diffusers_sample(net, scheduler, x_T, **timesteps):
    """The loop of a diffusers pipeline: set_timesteps, scale the prior, scale_model_input, step."""
    scheduler.set_timesteps(**timesteps)
    model, x = Counted(net), x_T * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(inp, t), t, x, return_dict=False)[0]
    return x, model.calls


@torch.no_grad()
def flow_heun(net, x_T, sigmas):
    """Heun's method on the flow ODE dx/dt = u(x, t) over `sigmas` (descending, ending at 0; the last step
    Euler, as k-diffusion's sample_heun): the velocity model's own fine solution."""
    model, x = Counted(net), x_T
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        d_cur = model(x, 1000 * t_cur)
        x_next = x + (t_next - t_cur) * d_cur                                # Euler step
        if t_next > 0:                                                       # second-order correction
            x_next = x + (t_next - t_cur) * 0.5 * (d_cur + model(x_next, 1000 * t_next))
        x = x_next
    return x, model.calls


def kdiff_sigmas(process, ts):
    """k-diffusion's and diffusers' Euler sigmas: nu(ts) descending, then 0 (float32). (so.to_sigmas takes
    whole schedules from t_min; call levels do not include t_min.)"""
    return torch.as_tensor(np.append(so.nsr(process, ts)[::-1], 0.0), dtype=torch.float32)


def table_timesteps(process, ts):
    """diffusers' integer timesteps round(t (N - 1)), descending (distinct, or an error)."""
    k = np.rint(np.asarray(ts) * (process.n_timesteps - 1)).astype(int)[::-1]
    if np.any(np.diff(k) >= 0):
        raise ValueError(f"two call levels round to the same timestep: {k.tolist()}")
    return k.tolist()


def flow_sigmas(process, ts, shift=FLOW_SHIFT):
    """FlowMatchEuler's custom sigmas: t descending, the top level at t_max sent as 1 (the prior), pre-unshifted
    so that diffusers' shift s t / (1 + (s - 1) t), which it applies to custom sigmas too, gives t back."""
    t = np.asarray(ts, dtype=float)[::-1].copy()
    if t[0] >= process.t_max * (1 - 1e-9):
        t[0] = 1.0
    return (t / (shift - (shift - 1) * t)).astype(np.float32)


# DDPMScheduler's config (and DDIMScheduler's default) has clip_sample=True: DDIM then clips its x0 prediction
# to [-1, 1] at every step, which is not the probability-flow ODE the other samplers and the fine solution
# integrate. The benchmark turns it off (DDIMScheduler(clip_sample=False)); DPMSolverMultistep and Euler
# have no clipping by default.
NO_CLIP = dict(clip_sample=False)


def samplers_of(ctx):
    net, process = ctx.net, ctx.process
    if ctx.family == "ve":
        def k(name):
            return lambda sigmas, x_T: ib.k_sample(net, name, x_T, sigmas)

        def ve_sampler(name, step):
            run = k(name)
            return dict(step=step, levels=(lambda n: n // 2) if name == "heun" else (lambda n: n),
                        run=lambda ts, x_T: run(kdiff_sigmas(process, ts), x_T),
                        defaults={"k-diff Karras ρ=7": lambda m, x_T: run(
                                      sampling.get_sigmas_karras(m, ib.SIGMA_MIN, ib.SIGMA_MAX, rho=7.0), x_T),
                                  "k-diff exponential": lambda m, x_T: run(
                                      sampling.get_sigmas_exponential(m, ib.SIGMA_MIN, ib.SIGMA_MAX), x_T)})
        return {"euler": ve_sampler("euler", "euler"), "heun": ve_sampler("heun", "heun"),
                "dpmpp_2m": ve_sampler("dpmpp_2m", "dpmpp_2m")}
    if ctx.family == "ddpm":
        config = ctx.scheduler.config

        def spacings(cls, karras):
            out = {f"{cls.__name__[:-9]} {s}": (lambda s: lambda m, x_T: diffusers_sample(
                net, cls.from_config(config, timestep_spacing=s, **NO_CLIP), x_T, num_inference_steps=m))(s)
                for s in ("leading", "trailing", "linspace")}
            if karras:
                out[f"{cls.__name__[:-9]} Karras"] = lambda m, x_T: diffusers_sample(
                    net, cls.from_config(config, use_karras_sigmas=True), x_T, num_inference_steps=m)
            return out
        dpm = dict(step="dpmpp_2m", levels=lambda n: n, defaults=spacings(DPMSolverMultistepScheduler, True),
                   run=lambda ts, x_T: diffusers_sample(net, DPMSolverMultistepScheduler.from_config(config), x_T,
                                                        timesteps=table_timesteps(process, ts)))
        ddim = dict(step="euler", levels=lambda n: n, defaults=spacings(DDIMScheduler, False),
                    run=lambda ts, x_T: diffusers_sample(net, DPMSolverMultistepScheduler.from_config(
                        config, solver_order=1), x_T, timesteps=table_timesteps(process, ts)))
        euler = dict(step="euler", levels=lambda n: n, defaults=spacings(EulerDiscreteScheduler, True),
                     run=lambda ts, x_T: diffusers_sample(net, EulerDiscreteScheduler.from_config(config), x_T,
                                                          sigmas=kdiff_sigmas(process, ts).tolist()))
        return {"DPM++(2M)": dpm, "DDIM": ddim, "Euler": euler}
    flow = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    return {"FlowMatchEuler": dict(
        step="euler", levels=lambda n: n,
        defaults={"FlowMatch set_timesteps(n)": lambda m, x_T: diffusers_sample(
            net, FlowMatchEulerDiscreteScheduler.from_config(flow.config), x_T, num_inference_steps=m)},
        run=lambda ts, x_T: diffusers_sample(net, FlowMatchEulerDiscreteScheduler.from_config(flow.config), x_T,
                                             sigmas=flow_sigmas(process, ts).tolist()))}


def prior_and_reference(ctx, n, levels, seed=PRIOR_SEED):
    """The prior draws (what each consumer starts from, the same for every row) and the model's own fine
    solution from them on `levels` levels: k-diffusion Heun on Karras sigmas (ve), diffusers'
    DPM-Solver++(2M) on "trailing" timesteps (ddpm; at most 1000), Heun on the flow ODE at uniform-in-t
    levels shifted by 3 (flow)."""
    gen = torch.Generator().manual_seed(seed)
    if ctx.family == "ve":
        size = int(math.isqrt(ctx.train.shape[1] // 3))
        x_T = torch.randn(n, 3, size, size, generator=gen) * ib.SIGMA_MAX
        return x_T, ib.k_sample(ctx.net, "heun", x_T, sampling.get_sigmas_karras(levels, ib.SIGMA_MIN, ib.SIGMA_MAX))
    x_T = torch.randn(n, ctx.train.shape[1], generator=gen)
    if ctx.family == "ddpm":
        return x_T, diffusers_sample(ctx.net, DPMSolverMultistepScheduler.from_config(
            ctx.scheduler.config, timestep_spacing="trailing"), x_T, num_inference_steps=levels)
    t = np.linspace(1.0, 0.0, levels + 1)
    return x_T, flow_heun(ctx.net, x_T, FLOW_SHIFT * t / (1 + (FLOW_SHIFT - 1) * t))


def ddim_check(ctx, x_T, m=10):
    """DDIMScheduler on its own spacings against the same timesteps through DPMSolverMultistep(solver_order=1)
    and through EulerDiscrete on the matching sigmas: max |difference| of the samples."""
    out = {}
    config = ctx.scheduler.config
    nu = ((1 - ctx.scheduler.alphas_cumprod) / ctx.scheduler.alphas_cumprod).sqrt()
    for spacing in ("leading", "trailing", "linspace"):
        ddim = DDIMScheduler.from_config(config, timestep_spacing=spacing, **NO_CLIP)
        ours, _ = diffusers_sample(ctx.net, ddim, x_T, num_inference_steps=m)
        k = [int(v) for v in ddim.timesteps]
        dpm1, _ = diffusers_sample(ctx.net, DPMSolverMultistepScheduler.from_config(config, solver_order=1), x_T,
                                   timesteps=k)
        eul, _ = diffusers_sample(ctx.net, EulerDiscreteScheduler.from_config(config), x_T,
                                  sigmas=nu[k].tolist() + [0.0])
        out[spacing] = dict(timesteps=k, dpm1=float((ours - dpm1).abs().max()), euler=float((ours - eul).abs().max()),
                            scale=float(ours.abs().max()))
    return out


# --------------------------------------------------------------------------------
# One family: find the schedules, sample through the consumers, measure
# --------------------------------------------------------------------------------

def as_found(found):
    """(ts, evaluations) of a rule's output: an array, or a result with .ts (and .n_evaluations)."""
    if found is None:
        return None, 0
    ts = np.asarray(getattr(found, "ts", found), dtype=float)
    return ts, int(getattr(found, "n_evaluations", 0) or 0)


def measure(x, reference, held_out):
    """Per-draw coupled errors (mean over coordinates), their mean and standard error, and sliced W1."""
    x = x.reshape(len(x), -1).double().numpy()
    if not np.all(np.isfinite(x)):
        return dict(coupled=np.inf, stderr=np.nan, sliced_w1=np.inf, per_draw=None)
    e = np.mean((x - reference) ** 2, axis=1)
    return dict(coupled=float(e.mean()), stderr=float(e.std(ddof=1) / np.sqrt(len(e))), per_draw=e,
                sliced_w1=sm.sliced_wasserstein(x, held_out[:len(x)], 0))


def evaluate(ctx, cfg, log):
    n, out = cfg["n_samples"] if ctx.family != "ve" else cfg["n_samples"] // 2, dict(rows=[], found={})
    levels = cfg["reference"][ctx.family]
    start = time.perf_counter()
    x_T, (ref, calls) = prior_and_reference(ctx, n, levels)
    _, (half, _) = prior_and_reference(ctx, n, levels // 2)
    reference, half = ref.reshape(n, -1).double().numpy(), half.reshape(n, -1).double().numpy()
    held_out = ctx.held_out.astype(np.float64)
    out["reference"] = dict(levels=levels, calls=calls, seconds=time.perf_counter() - start, n=n,
                            half_gap=float(np.mean((reference - half) ** 2)),
                            sliced_w1=sm.sliced_wasserstein(reference, held_out[:n], 0),
                            data_w1=sm.sliced_wasserstein(ctx.train[:n].astype(np.float64), held_out[:n], 0))
    log(f"  {ctx.family}: fine solution {levels} levels ({calls} calls, {out['reference']['seconds']:.0f} s); "
        f"its gap to {levels // 2} levels {out['reference']['half_gap']:.2e}")
    if ctx.family == "ddpm":
        out["ddim_check"] = ddim_check(ctx, x_T)
        log(f"  DDIMScheduler vs DPMSolverMultistep(solver_order=1) / Euler: {out['ddim_check']}")
    x0 = ctx.train[:cfg["n_x0"]].astype(np.float64)
    start = time.perf_counter()
    the_map = so.estimate_schedule_map(ctx.score, ctx.process, x0, RULE_SEED, budget=cfg["map_budget"], batch_size=1024)
    out["map"] = dict(evaluations=the_map.n_evaluations, seconds=time.perf_counter() - start)
    RULE_BUDGET_NOW[0] = cfg["rule_budget"]
    for sampler_name, spec in samplers_of(ctx).items():
        for n_calls in cfg["calls"]:
            m = spec["levels"](n_calls)
            runs = [(name, "default", (lambda run: lambda: run(m, x_T))(run), 0, 0.0)
                    for name, run in spec["defaults"].items()]
            for name, rule in RULES.items():
                start = time.perf_counter()
                try:
                    found = (top_levels(the_map.schedule(m)) if rule is None
                             else rule(ctx.score, ctx.process, m, x0, spec["step"]))
                except Exception as err:                 # a rule that fails is a row that says why
                    out["rows"].append(dict(family=ctx.family, sampler=sampler_name, n_calls=n_calls, rule=name,
                                            kind="library", error=f"{type(err).__name__}: {err}"))
                    log(f"    {name}: {type(err).__name__}: {err}")
                    continue
                ts, evaluations = as_found(found)
                if ts is None:
                    out["rows"].append(dict(family=ctx.family, sampler=sampler_name, n_calls=n_calls, rule=name,
                                            kind="library", error="not in the library yet"))
                    continue
                evaluations = the_map.n_evaluations if rule is None else evaluations
                out["found"][(sampler_name, n_calls, name)] = ts
                kind = "baseline" if name.startswith("lib ") else "library"
                runs.append((name, kind, (lambda ts: lambda: spec["run"](ts, x_T))(ts), evaluations,
                             time.perf_counter() - start))
            for name, kind, sample, evaluations, seconds in runs:
                row = dict(family=ctx.family, sampler=sampler_name, n_calls=n_calls, rule=name, kind=kind,
                           levels=m, evaluations=evaluations, find_seconds=seconds)
                try:
                    x, calls = sample()
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"
                    log(f"    {sampler_name} {n_calls} {name}: {row['error']}")
                else:
                    row.update(calls=calls, **measure(x, reference, held_out))
                out["rows"].append(row)
            done = [r for r in out["rows"]
                    if r["sampler"] == sampler_name and r["n_calls"] == n_calls and "coupled" in r]
            best = min(done, key=lambda r: r["coupled"])
            log(f"    {sampler_name:16s} {n_calls:2d} calls: best {best['rule']} {best['coupled']:.3e}")
    return out

# --------------------------------------------------------------------------------
# Settings and the run
# --------------------------------------------------------------------------------

def settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (tiny models); does not write docs/reports/")
    parser.add_argument("--cache", default=CACHE, help="folder for the trained models and the run's results")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, help="model families (default: ve ddpm flow)")
    parser.add_argument("--calls", type=int, nargs="+", help="model calls per sample (default: 4 6 8 10)")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the models and stop")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    parser.add_argument("--report-only", action="store_true",
                        help="write the report again from the last run's results.pkl in --cache")
    args = parser.parse_args(argv)
    cfg = dict(calls=CALLS, families=FAMILIES, n_samples=N_SAMPLES, n_x0=N_X0, n_train=N_TRAIN,
               n_held_out=N_HELD_OUT, map_budget=MAP_BUDGET, rule_budget=RULE_BUDGET, reference=dict(REFERENCE),
               train=dict(TRAIN), ve_model=VE_MODEL, mlp=MLP_SIZE, patch=PATCH, prefix="", cache=args.cache,
               threads=args.threads,
               train_only=args.train_only, quick=args.quick, report_only=args.report_only,
               write_docs=not (args.quick or args.train_only),
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
    saved = os.path.join(cfg["cache"], f"{cfg['prefix']}results.pkl")
    if cfg.get("report_only"):
        with open(saved, "rb") as f:
            results = pickle.load(f)
        return write_report(results, dict(results["cfg"], write_docs=cfg["write_docs"]), log)
    results = dict(cfg=cfg, families={}, begin=time.time(), load=[os.getloadavg()])
    for family in cfg["families"]:
        ctx = family_context(family, cfg, log)
        results["families"][family] = dict(info=ctx.info)
        if not cfg["train_only"]:
            start = time.perf_counter()
            results["families"][family].update(evaluate(ctx, cfg, log), seconds=time.perf_counter() - start)
        results["load"].append(os.getloadavg())
        results["seconds"] = time.time() - results["begin"]
        so.write_atomically(saved, pickle.dumps(results))
    if cfg["train_only"]:
        return results
    return write_report(results, cfg, log)


def write_report(results, cfg, log):
    results["report"] = report(results, cfg)
    path = REPORT if cfg["write_docs"] else os.path.join(cfg["cache"], f"{cfg['prefix']}calls.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    so.write_atomically(path, results["report"])
    log(f"wrote {path}; total {results['seconds'] / 60:.1f} minutes")
    return results


# --------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------

TITLE = dict(ve="(a) VE U-Net denoiser, 16x16 RGB patches, k-diffusion samplers",
             ddpm="(b) DDPM epsilon-model (DDPMScheduler(1000), linear betas), 8x8 RGB patches, diffusers schedulers",
             flow="(c) rectified-flow velocity model (SD3's recipe), 8x8 RGB patches, FlowMatchEuler(shift=3)")


NOTES = dict(
    ve="k-diffusion's samplers on sigmas; Heun's columns run n/2 levels, n − 1 calls.",
    ddpm="The epsilon-net is sigma_k x + alpha_k MLP(x, k) (`EpsNet`). The same MLP trained bare, with the same "
         "recipe and steps, had its own 1000-step ODE solution at sliced W1 7.2 from held-out patches (the data's "
         "own: 0.10): the ODE multiplies an error of epsilon by up to nu = 157 at timestep 999, and the bare MLP "
         "does not reach the identity that epsilon is there. DDIM runs without clip_sample (diffusers' default "
         "clips x0 to [-1, 1], which is not the ODE); a library schedule runs as DDIM through "
         "DPMSolverMultistepScheduler(solver_order=1, timesteps=...), which reproduces DDIMScheduler on its own "
         "timesteps (check below). DDIMScheduler's 'linspace' steps from each timestep to t − N/n, not to its "
         "next timestep: that is diffusers' own arithmetic, measured as it is.",
    flow="A schedule is sent as sigmas pre-unshifted for shift 3; the consumer's default is "
         "FlowMatchEulerDiscreteScheduler(shift=3.0).set_timesteps(n), which shifts a linspace that was "
         "already shifted at construction (diffusers' own arithmetic).")


def ratio(a, b):
    """mean(a) / mean(b) over paired draws, and its standard error (the delta method on a - r b)."""
    r = a.mean() / b.mean()
    return r, float(np.std(a - r * b, ddof=1) / np.sqrt(len(a)) / b.mean())


def columns(rows):
    return list(dict.fromkeys((r["sampler"], r["n_calls"]) for r in rows))


def cell(rows, key):
    return {(r["sampler"], r["n_calls"], r["rule"]): r for r in rows}.get(key)


def bests(rows, sampler, n_calls):
    here = [r for r in rows if (r["sampler"], r["n_calls"]) == (sampler, n_calls) and r.get("per_draw") is not None]
    default = min((r for r in here if r["kind"] == "default"), key=lambda r: r["coupled"], default=None)
    baseline = min((r for r in here if r["kind"] == "baseline"), key=lambda r: r["coupled"], default=None)
    return default, baseline


def report(results, cfg):
    load = results["load"]
    lines = ["# Schedules for n model calls through each consumer's own sampler (issue 29, part 5)", "",
             f"Written by `{cfg['command']}`: {results['seconds'] / 60:.0f} minutes in all on {machine()}, "
             f"`torch.set_num_threads({cfg['threads']})`, run under `nice` on a machine shared with other jobs "
             f"(load average {load[0][0]:.1f} at the start, {max(l[0] for l in load):.1f} at most between "
             f"families). torch {torch.__version__}, diffusers {diffusers.__version__}.", "",
             "Every schedule runs through the consumer's own sampler with exactly the stated model calls, counted "
             "by wrapping the model, from the same prior draws. Cells: the coupled error, the mean squared distance "
             "per coordinate to the model's own fine solution from the same draw (lower is better). Heun (k-diffusion) "
             "on m levels makes 2m − 1 calls: its column \"n calls\" runs m = n/2 levels, n − 1 calls. Library "
             "schedules (`lib …`, the paper's map, today's rule) are the top n of n + 1 levels: the model is not "
             "called at t_min; the sampler's last step goes to σ = 0 from the lowest call level. A cell marked — "
             "failed (the reason is listed below the table).", ""]
    lines += ["## The models and their fine solutions", "",
              "| family | model | training | fine solution | its gap to half the levels | smallest coupled error "
              "in the table | sliced W1: fine solution / training data, to held-out | benchmark (after training) |",
              "|---|---|---|---|---|---|---|---|"]
    for family, res in results["families"].items():
        info, ref = res["info"], res["reference"]
        smallest = min(r["coupled"] for r in res["rows"] if "coupled" in r)
        lines.append(f"| {family} | {describe_model(family, info, cfg)} | {info['seconds'] / 60:.1f} min wall, "
                     f"{info.get('threads', 1)} thread | {reference_name(family, ref['levels'])}, {ref['calls']} "
                     f"calls on {ref['n']} draws | {ref['half_gap']:.1e} | {smallest:.1e} | "
                     f"{ref['sliced_w1']:.4f} / {ref['data_w1']:.4f} | {res['seconds'] / 60:.1f} min |")
    lines += ["", "A fine solution has converged for this table when its gap to the half-resolution one is far below "
              "the smallest coupled error of the table.", ""]
    for family, res in results["families"].items():
        lines += family_tables(family, res)
    lines += summary(results)
    return "\n".join(lines) + "\n"


def describe_model(family, info, cfg):
    mlp, unet = f"MLP {cfg['mlp']['depth']}x{cfg['mlp']['width']}", cfg["ve_model"]["channels"]
    what = dict(ve=f"image_benchmark's U-Net, channels {unet}, EDM preconditioning",
                ddpm=f"sigma_k x + alpha_k {mlp}(x, k), sinusoidal timestep embedding, epsilon",
                flow=f"{mlp}, sinusoidal embedding of 1000 t, velocity")[family]
    return f"{what}, {info['parameters']:,} parameters"


def reference_name(family, levels):
    return dict(ve=f"k-diffusion Heun, Karras ρ=7, {levels} levels",
                ddpm=f"diffusers DPM-Solver++(2M), {levels} trailing timesteps",
                flow=f"Heun on the flow ODE, {levels} steps uniform in t shifted by 3")[family]


def family_tables(family, res):
    rows = res["rows"]
    cols = columns(rows)
    names = list(dict.fromkeys([r["rule"] for r in rows if r["kind"] == "default"] + list(RULES)))
    head = "| schedule | " + " | ".join(f"{s} {n}" for s, n in cols) + " | cost to find (evaluations) |"
    lines = [f"## {TITLE[family]}", "", NOTES[family], "", "Coupled error; the seed noise (standard error over the "
             f"{res['reference']['n']} draws) is {seed_noise(rows)} of each value.", "", head,
             "|" + "---|" * (len(cols) + 2)]
    errors = []
    for name in names:
        cells, costs = [], []
        for s, n in cols:
            r = cell(rows, (s, n, name))
            if r is None or "error" in r:
                cells.append("—")
                if r is not None and r["error"] not in errors:
                    errors.append(f"{name}: {r['error']}")
                continue
            d, b = bests(rows, s, n)
            mark = "**" if r is d or r is b else ""
            cells.append(f"{mark}{r['coupled']:.2e}{mark}")
            costs.append(r["evaluations"])
        cost = "—" if not costs else (f"{min(costs):,}" if min(costs) == max(costs)
                                      else f"{min(costs):,}–{max(costs):,}")
        if any(c != "—" for c in cells) or name in RULES:
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {cost} |")
    lines += ["", "Bold: the consumer's best default and the library's best baseline in each column. Cost: the "
              "model evaluations (rows through the score) spent finding the schedule in a cell, least–most over "
              "the cells (the map is estimated once per model and serves every cell; 'recommended' counts what it "
              "spends beyond its rule, whose cost is the row 'rule (n calls)', the same call with the same seed)."]
    if errors:
        lines += [""] + [f"- {e}" for e in dict.fromkeys(errors)]
    lines += ["", "Sliced W1 to held-out patches (the fine solution's: "
              f"{res['reference']['sliced_w1']:.4f}):", "", head.replace(" cost to find (evaluations) |", ""),
              "|" + "---|" * (len(cols) + 1)]
    for name in names:
        cells = []
        for s, n in cols:
            r = cell(rows, (s, n, name))
            cells.append("—" if r is None or "sliced_w1" not in r else f"{r['sliced_w1']:.4f}")
        if any(c != "—" for c in cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "ddim_check" in res:
        lines += ["", "DDIMScheduler (10 steps) against the same timesteps through DPMSolverMultistep(solver_order=1) "
                  "and through EulerDiscrete on the matching sigmas (max |difference| of the samples):", ""]
        lines += [f"- {sp}: timesteps {c['timesteps']}; DPMSolverMultistep(solver_order=1) {c['dpm1']:.1e}, Euler "
                  f"{c['euler']:.1e}" for sp, c in res["ddim_check"].items()]
    lines.append("")
    return lines


def seed_noise(rows):
    rel = [r["stderr"] / r["coupled"] for r in rows if r.get("per_draw") is not None and r["coupled"] > 0]
    return f"{100 * min(rel):.0f}–{100 * max(rel):.0f}%" if rel else "—"


def summary(results):
    """Per cell: the library's rows against the consumer's best default and the library's best baseline."""
    lines = ["## Summary: ratios to the consumer's best default and to the library's best baseline", "",
             "Coupled error of each library row divided by the best default's and by the best baseline's in the same "
             "cell, ± the standard error (paired over the draws). Below 1 is better than the best of them.", "",
             "| family | sampler | calls | best default | best baseline | best baseline / best default | "
             "paper's map | equal error (today) | rule (n calls) | recommended |", "|" + "---|" * 10]
    for family, res in results["families"].items():
        rows = res["rows"]
        for s, n in columns(rows):
            d, b = bests(rows, s, n)
            if d is None or b is None:
                continue
            out = [f"{d['rule']} {d['coupled']:.2e}", f"{b['rule']} {b['coupled']:.2e}",
                   "{:.2f} ± {:.2f}".format(*ratio(b["per_draw"], d["per_draw"]))]
            for name in ("paper's map", "equal error (today)", "rule (n calls)", "recommended"):
                r = cell(rows, (s, n, name))
                if r is None or r.get("per_draw") is None:
                    out.append("—")
                    continue
                out.append("{:.2f} ± {:.2f} / {:.2f} ± {:.2f}".format(*ratio(r["per_draw"], d["per_draw"]),
                                                                       *ratio(r["per_draw"], b["per_draw"])))
            lines.append(f"| {family} | {s} | {n} | " + " | ".join(out) + " |")
    lines += ["", "Each library column: ratio to the best default / ratio to the best baseline. "
              "'rule (n calls)' and 'recommended' are `sampler.equal_error_calls` and `sampler.recommended_schedule` "
              "(issue 29, parts 1-3); a — there means the call is not in the library yet.", ""]
    return lines


def machine():
    return f"{platform.machine()} ({os.cpu_count()} cores), Python {platform.python_version()}"


if __name__ == "__main__":
    main(sys.argv[1:])
