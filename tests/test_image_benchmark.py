"""The image benchmark (examples/benchmarks/image_benchmark.py, issue 26) at toy scale.

8x8 RGB patches of two photographs, a tiny U-Net trained for a few steps, two rules, the Heun
sampler: the whole pipeline runs (training, saving and reusing the model, the schedules through
`score_from_denoiser`, k-diffusion's sampler, the metrics, the report), and the project's
`sampler.sample` agrees with k-diffusion's `sample_heun` on the same schedule and draw. Skips
where PyTorch, k-diffusion or scikit-image is not installed (none is a dependency).
"""
import numpy as np
import pytest

from oracles import load_benchmark

torch = pytest.importorskip("torch", reason="the image benchmark needs PyTorch")
pytest.importorskip("skimage", reason="the image benchmark needs scikit-image")
try:                                    # k-diffusion can fail on import in other ways (pkg_resources, torchvision)
    import k_diffusion.sampling  # noqa: F401  (imported to skip where it fails)
except Exception as err:
    pytest.skip(f"the image benchmark needs k-diffusion ({type(err).__name__}: {err})", allow_module_level=True)

RULES = ("EDM ρ=7", "equal error (rank 64)")


def load():
    return load_benchmark("image_benchmark")


def tiny(module, out):
    cfg = module.settings(["--quick", "--out", str(out), "--threads", "1"])
    cfg.update(sizes=(8,), seeds=(0,), photos=("astronaut", "coffee"), n_train=2000, n_held_out=400,
               n_samples={8: 64}, n_mmd=64, n_x0=200, n_agreement=16, rules=RULES, samplers=("heun",),
               model={8: dict(channels=(8, 16), patch=2, emb=16)},
               train={8: dict(steps=30, batch_size=32, lr=2e-3, warmup=10, ema=0.99)}, reference_levels=50,
               figure=False)
    return cfg


def test_tiny_image_benchmark_runs_and_our_sampler_is_k_diffusions(tmp_path):
    module = load()
    cfg = tiny(module, tmp_path)
    assert not cfg["write_docs"]
    lines = []
    out = module.run(cfg, log=lines.append)

    # The model was trained, saved under --out, and is reused (not retrained) when present.
    path = tmp_path / "quick_model_8_0.pt"
    assert path.exists()
    train, held_out = module.patches(8, cfg["n_train"], cfg["n_held_out"], cfg["photos"])
    assert train.shape[1] == 192 and train.min() >= -1 and train.max() <= 1
    again = []
    model, info = module.trained_model(8, 0, train, held_out, cfg, str(path), again.append)
    assert "loaded" in again[0] and info["parameters"] == out["models"][(8, 0)]["parameters"]

    # sampler.sample with the Heun step and denoise=True is k-diffusion's sample_heun: the same samples
    # to float32 rounding, the same number of model calls (2n - 1 for n = 11 levels).
    assert len(out["agreement"]) == 2
    for row in out["agreement"]:
        assert row["nfe_ours"] == row["calls_k"] == 21
        assert row["max_diff64"] <= 1e-4 * max(1.0, row["scale"]), row
        assert row["max_diff32"] <= 1e-3 * max(1.0, row["scale"]), row
    assert out["calls"][("heun", 11)] == 21 and out["calls"][("reference", 50)] == 99

    # Every rule has a row with finite metrics, and a row in each of the report's tables.
    rows = {r["rule"]: r for r in out["rows"]}
    assert set(rows) == set(RULES)
    for r in rows.values():
        assert np.isfinite(r["coupled"]) and r["coupled"] > 0 and np.isfinite(r["sliced_w1"]) and r["calls"] == 21
    found = [r for r in out["found"] if r["rule"] == "equal error (rank 64)"]
    assert len(found) == 1 and found[0]["evaluations"] > 0 and found[0]["seconds"] > 0
    report = out["report"]
    for rule in RULES:
        assert report.count(f"| {rule} |") >= 3, rule          # coupled error, sliced W1, MMD^2
    assert "| equal error (rank 64) | heun | 0 |" in report      # the cost of finding it
    assert (tmp_path / "image.md").read_text() == report

    # The figure draws every rule of the benchmark (each with its own colour), here from the tiny run's
    # schedules relabelled as each rule in turn.
    pytest.importorskip("matplotlib", reason="the figure needs matplotlib")
    colours = module.rule_colours()
    assert set(colours) == set(module.RULES) and len({str(c) for c in colours.values()}) == len(colours)
    every = dict(out, found=[dict(r, rule=name) for name in module.RULES for r in out["found"]])
    drawn = module.figures(every, dict(cfg, rules=tuple(module.RULES)), str(tmp_path / "image.png"), lines.append)
    assert drawn and (tmp_path / "image.png").stat().st_size > 10_000
