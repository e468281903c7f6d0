"""measureflow.reductions against dense formulas (DESIGN.md, "The numerical spine").

Every reference below is the plain N×M formula in float64, written independently of the module:
kernel values from their definitions (KERNELS), gradients by torch.autograd of the dense sum (so no
hand-derived gradient formula is shared with the code under test), softmax averages and
log-sum-exps through torch.softmax / torch.logsumexp.

Both execution paths are forced in turn (fixture ``path``: MEASUREFLOW_COMPILE read into a fresh
ReductionConfig, and the other path replaced by a function that fails, so a silent fallback cannot
pass for the path under test). Explicit block sizes smaller than N and M make every test cross
row and column blocks, with uneven tails.

Tolerances
----------
float64 (RTOL64 = 1e-11, relative to the reference's max-norm): each entry is a sum of at most
2,000 terms; blocked and dense summation orders differ, which bounds the difference by
M·ε₆₄·max-term ≈ 2·10³ · 1.1·10⁻¹⁶ ≈ 2·10⁻¹³ of the max-norm, times a few for exp/sqrt rounding and
the centring/GEMM identity used for d > 4 (an absolute exponent error ≈ ε₆₄·(|x−c|² + |y−c|²)/h²
≲ 10⁻¹⁴ for these standard-normal clouds). 1e-11 leaves a margin of 50× over that and is 10⁸
below the effect of any real mistake (a dropped block or a wrong rescale changes results by ≥ 10⁻³).

float32 on the fused path (RTOL32 = 2e-5): the polynomial exp is accurate to 2.2·10⁻⁷ relative,
float32 differences and squares add ≈ 2ε₃₂·r² ≤ 4·10⁻⁶ relative in k for the exponents that
matter (r² ≲ 30 in natural units; smaller terms are below the sum's own rounding), and a float32
sum of M = 2,000 terms in 8-lane accumulators loses at most (M/8)·ε₃₂ ≈ 1.5·10⁻⁵ in the worst
case, √M·ε₃₂ ≈ 3·10⁻⁶ typically.

Compiles: the fused tests use eight static configurations in all (reduction, kernel or score, d,
value channels, gradient, dtype); each compiles once (a few seconds, cached on disk by torch) and is
then reused across N, M and R, which one test checks directly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from measureflow import reductions as red
from measureflow.reductions import compile_cache
from measureflow.errors import ShapeError, StateError

RTOL64 = 1e-11
RTOL32 = 2e-5
RADIAL = ["gaussian", "laplace", "energy", "imq"]
HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))


# -- helpers ------------------------------------------------------------------------------------


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def simplex(R, M, seed=1, dtype=torch.float64):
    """Random weights, positive, summing to one in each of R replicas (different per replica)."""
    w = torch.rand(R, M, generator=gen(seed), dtype=torch.float64) + 0.05
    return (w / w.sum(-1, keepdim=True)).to(dtype)


def close(actual, expected, rtol):
    """max |actual − expected| ≤ rtol · max |expected| (and the shapes agree)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3e} exceeds {rtol:.1e} × max-norm {scale:.3e}"


def dense_kernel(name, h, x, y):
    """k(xᵢ, yⱼ) from the definitions in KERNELS: x (R, N, d), y (R, M, d) → (R, N, M)."""
    r2 = ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1)
    if name == "gaussian":
        return torch.exp(-r2 / (2 * h * h))
    if name == "laplace":
        return torch.exp(-r2.sqrt() / h)
    if name == "energy":
        return -r2.sqrt()
    if name == "imq":
        return (1 + r2 / (h * h)) ** -0.5
    if name == "poly2":
        return torch.einsum("rnd,rmd->rnm", x, y) ** 2
    if name == "poly2_affine":
        return (1 + torch.einsum("rnd,rmd->rnm", x, y)) ** 2
    return name(r2)  # a callable of the squared distance


def dense_sum(name, h, x, y, w, v=None):
    """S = Σⱼ wⱼ k(xᵢ, yⱼ) vⱼ and G = ∇ₓ Σⱼ wⱼ k(xᵢ, yⱼ) by autograd (float64)."""
    x = x.double().detach().requires_grad_(True)
    y, w = y.double(), w.double()
    with torch.enable_grad():
        k = dense_kernel(name, h, x, y)  # (R, N, M)
        S1 = (k * w[:, None, :]).sum(-1)  # Σⱼ wⱼ k
        (G,) = torch.autograd.grad(S1.sum(), x)  # Sᵢ depends on xᵢ alone, so this is ∇ₓSᵢ
    S = S1.detach() if v is None else torch.einsum("rnm,rm,rmc->rnc", k.detach(), w, v.double())
    return S, G


def dense_softmax(q, k, v, logw, score, scale):
    q, k, v, logw = q.double(), k.double(), v.double(), logw.double()
    if score == "sqdist":
        s = -scale * ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1)
    else:
        s = scale * torch.einsum("rnd,rmd->rnm", q, k)
    logits = s + logw[:, None, :]
    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)


def clouds(R, N, M, d, seed=0, dtype=torch.float64):
    g = gen(seed)
    x = torch.randn(R, N, d, generator=g, dtype=torch.float64)
    y = torch.randn(R, M, d, generator=g, dtype=torch.float64) * 1.3 + 0.2
    return x.to(dtype), y.to(dtype)


@pytest.fixture(params=["eager", "fused"])
def path(request, monkeypatch):
    # used directly (both paths) or through indirect parametrisation (one path per case)
    """Force one execution path through MEASUREFLOW_COMPILE; make the other one fail loudly."""
    fused = request.param == "fused"
    if fused and not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    monkeypatch.setenv("MEASUREFLOW_COMPILE", "1" if fused else "0")
    monkeypatch.setattr(red, "config", red.ReductionConfig())
    monkeypatch.setattr(red.fused, "failure", None)

    def forbidden(*args, **kwargs):
        raise AssertionError(f"the {'eager' if fused else 'fused'} path ran while the {request.param} path was forced")

    if fused:
        monkeypatch.setattr(red.kernel_sums, "_eager_kernel_sum", forbidden)
        monkeypatch.setattr(red.softmax, "_eager_softmax", forbidden)
    else:
        monkeypatch.setattr(red.kernel_sums, "_fused_kernel_sum", forbidden)
        monkeypatch.setattr(red.softmax, "_fused_softmax", forbidden)
    return request.param


# -- kernel sum: values and gradients against the dense formula -----------------------------------

# (kernel, d, value channels): every kernel on the eager path, d = 6 through the GEMM identity; on
# the fused path every kernel's value and gradient at d = 2 and several value channels at d = 3
# (each configuration is one compile).
KS_CASES = [("eager", (k, d, c)) for k in RADIAL for (d, c) in ((2, 0), (3, 3), (6, 0), (6, 2))] + [
    ("fused", (k, 2, 0)) for k in RADIAL
] + [("fused", ("gaussian", 3, 3))]


@pytest.mark.parametrize("path, case", KS_CASES, indirect=["path"], ids=[f"{p}-{k}-d{d}-c{c}" for p, (k, d, c) in KS_CASES])
def test_kernel_sum_matches_dense(path, case):
    name, d, channels = case
    R, N, M, h = 3, 301, 437, 0.8
    seed = RADIAL.index(name) * 10 + d + channels
    x, y = clouds(R, N, M, d, seed=seed)
    w = simplex(R, M, seed=seed)
    block = (64, 96)  # 5 × 5 blocks with uneven tails
    if channels:
        v = torch.randn(R, M, channels, generator=gen(7), dtype=torch.float64)
        S_ref, _ = dense_sum(name, h, x, y, w, v)
        S = red.kernel_sum(x, y, v, w, kernel=name, bandwidth=h, block_size=block)
        assert S.shape == (R, N, channels)
        close(S, S_ref, RTOL64)
    else:
        S_ref, G_ref = dense_sum(name, h, x, y, w)
        S, G = red.kernel_sum(x, y, weights=w, kernel=name, bandwidth=h, gradient="both", block_size=block)
        assert S.shape == (R, N) and G.shape == (R, N, d)
        close(S, S_ref, RTOL64)
        close(G, G_ref, RTOL64)
        G_only = red.kernel_sum(x, y, weights=w, kernel=name, bandwidth=h, gradient=True, block_size=block)
        close(G_only, G_ref, RTOL64)
        if path == "eager":  # on the fused path value-only is another compile; float32 covers it below
            S_only = red.kernel_sum(x, y, weights=w, kernel=name, bandwidth=h, block_size=block)
            close(S_only, S_ref, RTOL64)


def test_kernel_sum_large_blocked_gaussian(path):
    """N = M = 2,000, two replicas sharing one source set, default and explicit blocks."""
    R, N, M, d, h = 2, 2000, 2000, 2, 0.5
    x, _ = clouds(R, N, 1, d, seed=3)
    y = torch.randn(M, d, generator=gen(4), dtype=torch.float64)  # shared by both replicas
    w = simplex(1, M, seed=5)[0]
    S_ref, G_ref = dense_sum("gaussian", h, x, y.expand(R, M, d), w.expand(R, M))
    for block in (None, (300, 700)):
        S, G = red.kernel_sum(x, y, weights=w, bandwidth=h, gradient="both", block_size=block)
        close(S, S_ref, RTOL64)
        close(G, G_ref, RTOL64)


def test_kernel_sum_gaussian_float32_matches_float64():
    """float32 on the fused path (polynomial exp) and the eager path stay within float32 rounding."""
    if not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    R, N, M, d, h = 2, 500, 2000, 2, 0.7
    x, y = clouds(R, N, M, d, seed=11)
    w = simplex(R, M, seed=12)
    S_ref, _ = dense_sum("gaussian", h, x, y, w)
    for mode in ("on", "off"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(red, "config", red.ReductionConfig(compile=mode))
            S = red.kernel_sum(x.float(), y.float(), weights=w.float(), bandwidth=h, block_size=(128, 512))
        assert S.dtype == torch.float32
        close(S, S_ref, RTOL32)


def test_fused_kernel_is_reused_across_shapes(monkeypatch):
    """One compile serves every N, M, R — including one-row and one-column calls."""
    if not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    import torch._dynamo.utils

    monkeypatch.setattr(red, "config", red.ReductionConfig(compile="on"))
    x, y = clouds(1, 40, 50, 2, seed=20)
    red.kernel_sum(x, y, bandwidth=0.9, gradient="both")  # compiled here if not yet
    counters = torch._dynamo.utils.counters
    graphs, built = counters["stats"]["unique_graphs"], counters["inductor"]["fxgraph_cache_miss"]
    for R, N, M in ((1, 1, 7), (3, 5, 1), (2, 33, 33), (4, 2, 2)):
        x, y = clouds(R, N, M, 2, seed=R + N + M)
        w = simplex(R, M, seed=N)
        S_ref, G_ref = dense_sum("gaussian", 0.9, x, y, w)
        S, G = red.kernel_sum(x, y, weights=w, bandwidth=0.9, gradient="both", block_size=(3, 4))
        close(S, S_ref, RTOL64)
        close(G, G_ref, RTOL64)
    assert counters["stats"]["unique_graphs"] == graphs, "a new shape recompiled"
    assert counters["inductor"]["fxgraph_cache_miss"] == built, "a new shape made inductor generate code"


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._dynamo.utils import counters
    from measureflow import reductions as red
    torch.set_num_threads(int(sys.argv[1]))  # the serial and the parallel kernels are separate compiles
    red.config.compile = "on"
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(1, 123, 2, generator=g, dtype=torch.float64), torch.randn(1, 77, 2, generator=g, dtype=torch.float64)
    red.kernel_sum(x, y, bandwidth=0.9, gradient="both")
    assert "kernel_sum" in str(list(red.fused.kernels)), "the fused path did not run"
    print(json.dumps({**counters["inductor"], **counters["aot_autograd"]}))
    """
)


def test_fused_kernel_is_served_from_disk_to_a_fresh_process(monkeypatch):
    """After one compile on this machine, a new process at a new N compiles nothing.

    This process compiles the float64 Gaussian kernel sum (or finds it on disk already); a fresh
    interpreter, with the environment this one compiled under (so the same
    TORCHINDUCTOR_CACHE_DIR, the lasting directory of ``reductions.compile_cache`` unless set),
    calls it at sizes this process never used. A compile there is an inductor FX-graph or
    AOTAutograd cache miss; finding the kernel on disk is a hit. No counter depends on timing.
    """
    if not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    monkeypatch.setattr(red, "config", red.ReductionConfig(compile="on"))
    x, y = clouds(1, 40, 50, 2, seed=20)
    red.kernel_sum(x, y, bandwidth=0.9, gradient="both")
    assert os.environ.get(compile_cache.ENV), "no compile-cache directory chosen before the compile"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(torch.get_num_threads())],
        capture_output=True, text=True, env=dict(os.environ), timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert counts.get("fxgraph_cache_miss", 0) == 0 and counts.get("autograd_cache_miss", 0) == 0, counts
    assert counts.get("fxgraph_cache_hit", 0) + counts.get("autograd_cache_hit", 0) >= 1, counts


def test_compile_cache_directory_defaults_to_a_lasting_one(monkeypatch, tmp_path):
    """Unset or torch's default: $XDG_CACHE_HOME/measureflow/inductor, created; set by the user: left alone."""
    cc = compile_cache
    monkeypatch.setenv(cc.ENV, "")  # recorded, so that teardown restores the variable as it was
    monkeypatch.delenv(cc.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    chosen = cc.use_lasting_directory()
    assert chosen == str(tmp_path / "measureflow" / "inductor") == os.environ[cc.ENV]
    assert Path(chosen).is_dir()
    monkeypatch.setenv(cc.ENV, str(tmp_path / "mine"))
    assert cc.use_lasting_directory() == str(tmp_path / "mine")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(cc.ENV, default_cache_dir())  # what importing torch._dynamo writes there
    assert cc.use_lasting_directory() == str(tmp_path / "measureflow" / "inductor")
    monkeypatch.delenv(cc.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    (tmp_path / "file").write_text("not a directory")
    assert cc.use_lasting_directory() is None  # torch keeps its default
    assert os.environ.get(cc.ENV) in (None, default_cache_dir())


def test_singular_kernels_at_coincident_points(path):
    """At x = yⱼ the laplace/energy gradient contribution of that pair is 0 (KERNELS), the rest exact."""
    R, N, M, d = 2, 40, 90, 2
    _, y = clouds(R, 1, M, d, seed=30)
    x = y[:, :N].clone()  # every query sits exactly on a source point
    w = simplex(R, M, seed=31)
    for name in ("energy", "laplace"):
        S, G = red.kernel_sum(x, y, weights=w, kernel=name, bandwidth=0.6, gradient="both", block_size=(16, 32))
        diff = x[:, :, None, :] - y[:, None, :, :]
        r = diff.norm(dim=-1)
        k = dense_kernel(name, 0.6, x, y)
        dk_dr = -torch.ones_like(r) if name == "energy" else -k / 0.6
        unit = torch.where(r[..., None] > 0, diff / r.clamp_min(1e-300)[..., None], 0.0)
        G_ref = ((w[:, None, :] * dk_dr)[..., None] * unit).sum(2)
        assert torch.isfinite(G).all()
        close(S, (k * w[:, None, :]).sum(-1), RTOL64)
        close(G, G_ref, RTOL64)


def test_clouds_far_from_the_origin_keep_their_accuracy(path):
    """Both clouds shifted by 10³: only differences matter, so neither the GEMM identity (d = 6)
    nor xᵢΣg − Σg·y (the gradient's one-GEMM form) may lose digits to |x|. Without centring on the
    sources' mean the exponent's absolute error would be ε₆₄·|x|²/h² ≈ 3·10⁻¹⁰, 30× over RTOL64."""
    R, N, M, h = 2, 120, 150, 0.8
    for d in (2, 6) if path == "eager" else (2,):
        x, y = clouds(R, N, M, d, seed=35 + d)
        x, y = x + 1e3, y + 1e3
        w = simplex(R, M, seed=36)
        S_ref, G_ref = dense_sum("gaussian", h, x - 1e3, y - 1e3, w)  # the same numbers, computed near 0
        S, G = red.kernel_sum(x, y, weights=w, bandwidth=h, gradient="both", block_size=(32, 64))
        close(S, S_ref, RTOL64)
        close(G, G_ref, RTOL64)


def test_polynomial_exp_is_float32_accurate():
    """The fused float32 paths' exp: relative error ≤ 3·10⁻⁷ (2.2·10⁻⁷ claimed, plus the rounding
    of the float32 argument's own evaluation order) on [−87, 0], and exactly 0 below −87."""
    t = torch.linspace(-87.0, 0.0, 400_001, dtype=torch.float32)
    exact = torch.exp(t.double())
    err = ((red.fused_kernels.exp32(t).double() - exact) / exact).abs().max().item()
    assert err <= 3e-7, err
    assert torch.equal(red.fused_kernels.exp32(torch.tensor([-87.5, -1e4, -math.inf])), torch.zeros(3))


@pytest.mark.parametrize("name", ["poly2", "poly2_affine"])
def test_polynomial_kernels(name):
    R, N, M, d = 2, 50, 70, 3
    x, y = clouds(R, N, M, d, seed=40)
    w = simplex(R, M, seed=41)
    v = torch.randn(R, M, 2, generator=gen(42), dtype=torch.float64)
    S_ref, G_ref = dense_sum(name, 1.0, x, y, w)
    S, G = red.kernel_sum(x, y, weights=w, kernel=name, gradient="both")
    close(S, S_ref, RTOL64)
    close(G, G_ref, RTOL64)
    close(red.kernel_sum(x, y, v, w, kernel=name), dense_sum(name, 1.0, x, y, w, v)[0], RTOL64)


def test_callable_kernel():
    R, N, M, d = 2, 60, 80, 3
    x, y = clouds(R, N, M, d, seed=50)
    w = simplex(R, M, seed=51)

    def cauchy(r2):
        return 1.0 / (1.0 + r2)

    S_ref, G_ref = dense_sum(cauchy, 1.0, x, y, w)
    S, G = red.kernel_sum(x, y, weights=w, kernel=cauchy, gradient="both", block_size=(16, 24))
    close(S, S_ref, RTOL64)
    close(G, G_ref, RTOL64)
    # a kernel that ignores its argument has zero gradient (not an autograd error)
    G0 = red.kernel_sum(x, y, weights=w, kernel=lambda r2: torch.ones_like(r2), gradient=True)
    assert torch.equal(G0, torch.zeros_like(G0))


def test_unbatched_inputs_give_unbatched_outputs_without_history():
    x, y = clouds(1, 20, 30, 2, seed=60)
    x, y = x[0], y[0]
    S, G = red.kernel_sum(x, y, gradient="both")
    assert S.shape == (20,) and G.shape == (20, 2)
    S_ref, G_ref = dense_sum("gaussian", 1.0, x[None], y[None], torch.full((1, 30), 1 / 30, dtype=torch.float64))
    close(S, S_ref[0], RTOL64)  # weights=None means uniform 1/M (MATH.md §0)
    close(G, G_ref[0], RTOL64)
    avg = red.softmax_average(x, y)
    assert avg.shape == (20, 2) and not avg.requires_grad


# -- softmax average ------------------------------------------------------------------------------

SM_CASES = [
    ("eager", ("sqdist", 2, 3)),
    ("eager", ("sqdist", 6, 2)),  # the GEMM identity with the row term returned to LSE
    ("eager", ("bilinear", 3, 0)),  # 0 channels: values=None averages the keys
    ("eager", ("bilinear", 2, 3)),
    ("fused", ("sqdist", 2, 3)),
    ("fused", ("bilinear", 2, 3)),
]


@pytest.mark.parametrize("path, case", SM_CASES, indirect=["path"], ids=[f"{p}-{s}-d{d}-c{c}" for p, (s, d, c) in SM_CASES])
def test_softmax_average_matches_dense(path, case):
    score, d, channels = case
    R, N, M = 3, 257, 389
    q, k = clouds(R, N, M, d, seed=70 + d + channels)
    w = simplex(R, M, seed=71)
    v = torch.randn(R, M, channels, generator=gen(72), dtype=torch.float64) if channels else None
    for scale in (0.7, 3.0):
        avg, lse = red.softmax_average(
            q, k, v, w, score=score, scale=scale, return_logsumexp=True, block_size=(50, 80)
        )
        avg_ref, lse_ref = dense_softmax(q, k, k if v is None else v, w.log(), score, scale)
        assert avg.shape == (R, N, channels or d) and lse.shape == (R, N)
        close(avg, avg_ref, RTOL64)
        close(lse, lse_ref, RTOL64)


def test_softmax_extreme_scores_stream_across_blocks(path):
    """Scores of ±10³…10⁴ where a naive exp over- or underflows; the maximum moves between blocks.

    Keys are sorted by distance to the queries' region in decreasing order, so the dominant key of
    each query sits in the last column block: every earlier partial sum must be rescaled by
    e^{m_old − m_new} ≈ e^{−10³} (exactly 0 in float64) and the result still comes out exact.
    """
    R, N, M, d = 2, 64, 300, 2
    q, k = clouds(R, N, M, d, seed=80)
    order = (k - q.mean(1, keepdim=True)).norm(dim=-1).argsort(dim=1, descending=True)
    k = torch.gather(k, 1, order[..., None].expand(R, M, d))
    v = torch.randn(R, M, 3, generator=gen(81), dtype=torch.float64)
    logw = simplex(R, M, seed=82).log()
    logw[:, ::7] = -math.inf  # excluded points
    for score, scale in (("sqdist", 1e4), ("sqdist", 2e3), ("bilinear", 1e3), ("bilinear", -1e3)):
        if score == "sqdist":
            s = -scale * ((q[:, :, None] - k[:, None]) ** 2).sum(-1)
        else:
            s = scale * torch.einsum("rnd,rmd->rnm", q, k)
        naive = torch.exp(s + logw[:, None, :])
        naive_fails = (naive.sum(-1) == 0).any() or torch.isinf(naive).any()
        assert naive_fails, "the scores are not extreme enough to make this test meaningful"
        avg, lse = red.softmax_average(
            q, k, v, log_weights=logw, score=score, scale=scale, return_logsumexp=True, block_size=(16, 64)
        )
        avg_ref, lse_ref = dense_softmax(q, k, v, logw, score, scale)
        assert torch.isfinite(avg).all() and torch.isfinite(lse).all()
        close(avg, avg_ref, RTOL64)
        # LSE ≈ −scale·r²_min is of order 10³…10⁴: compare relative to its own magnitude
        close(lse, lse_ref, RTOL64)


def test_softmax_uniform_weights_and_logsumexp_identity():
    """weights=None means uniform 1/M, so LSE is a log-mean-exp; the average of the keys (values=None)."""
    R, N, M, d = 2, 30, 45, 3
    q, k = clouds(R, N, M, d, seed=90)
    avg, lse = red.softmax_average(q, k, scale=0.5, return_logsumexp=True, block_size=(7, 11))
    s = -0.5 * ((q[:, :, None] - k[:, None]) ** 2).sum(-1)
    close(lse, torch.logsumexp(s, -1) - math.log(M), RTOL64)
    close(avg, torch.softmax(s, -1) @ k, RTOL64)
    # explicit uniform weights give the same numbers
    avg_w = red.softmax_average(q, k, weights=torch.full((M,), 1 / M, dtype=torch.float64), scale=0.5)
    close(avg_w, avg, RTOL64)


# -- policy: which path runs, compile failures -----------------------------------------------------


def test_env_selects_the_path(monkeypatch):
    for raw, expected in (("0", "off"), ("off", "off"), ("1", "on"), ("yes", "on"), ("", "auto"), ("auto", "auto")):
        monkeypatch.setenv("MEASUREFLOW_COMPILE", raw)
        assert red.ReductionConfig().compile == expected
    monkeypatch.setenv("MEASUREFLOW_COMPILE", "sometimes")
    with pytest.raises(StateError, match="MEASUREFLOW_COMPILE must be 0, 1 or auto; received 'sometimes'"):
        red.ReductionConfig()
    monkeypatch.setenv("MEASUREFLOW_REDUCTION_MEMORY_MIB", "-3")
    monkeypatch.delenv("MEASUREFLOW_COMPILE")
    with pytest.raises(StateError, match="MEASUREFLOW_REDUCTION_MEMORY_MIB must be positive"):
        red.ReductionConfig()


def test_auto_chooses_the_path_by_the_call_size_alone(monkeypatch):
    """'auto': a call fuses iff its own pairs reach compile_min_pairs, whatever ran before — the
    paths round differently, so a history-dependent choice would make runs irreproducible."""
    monkeypatch.setattr(red, "config", red.ReductionConfig(compile="auto", compile_min_pairs=40 * 50))
    monkeypatch.setattr(red.fused, "failure", None)
    ran = []
    eager = red.kernel_sums._eager_kernel_sum

    def fake_fused(key, h, x, y, v, w, want_value, want_grad, block):
        ran.append("fused")
        return eager(key[1], h, x, y, v, w, want_value, want_grad, block)

    def spy_eager(*args):
        ran.append("eager")
        return eager(*args)

    monkeypatch.setattr(red.kernel_sums, "_fused_kernel_sum", fake_fused)
    monkeypatch.setattr(red.kernel_sums, "_eager_kernel_sum", spy_eager)
    small_x, small_y = clouds(1, 40, 49, 2, seed=100)
    x, y = clouds(1, 40, 50, 2, seed=100)
    for _ in range(3):
        red.kernel_sum(small_x, small_y, kernel="imq")
    red.kernel_sum(x, y, kernel="imq")
    red.kernel_sum(small_x, small_y, kernel="imq")  # after a fused call of the same configuration
    assert ran == ["eager", "eager", "eager", "fused", "eager"]
    red.config.compile = "off"
    red.kernel_sum(x, y, kernel="imq")
    assert ran[-1] == "eager"
    red.config.compile = "on"
    red.kernel_sum(small_x, small_y, kernel="laplace")
    assert ran[-1] == "fused"


def test_compile_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(red, "config", red.ReductionConfig(compile="on"))
    monkeypatch.setattr(red.fused, "failure", None)

    def broken(*args):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(red.fused, "compiled_kernel", lambda kind, key, make: broken)
    x, y = clouds(2, 30, 40, 2, seed=110)
    expected = dense_sum("gaussian", 1.0, x, y, torch.full((2, 40), 1 / 40, dtype=torch.float64))[0]
    with pytest.warns(RuntimeWarning, match="torch.compile of the fused reduction failed .*no C\\+\\+ compiler"):
        S = red.kernel_sum(x, y)
    close(S, expected, RTOL64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the failure is remembered
        close(red.kernel_sum(x, y), expected, RTOL64)
        red.softmax_average(x, y)


def test_eager_blocks_respect_the_memory_budget():
    """The blocks the eager path picks at N = M = 200,000 stay within budget and cache cap."""
    for R, itemsize in ((1, 4), (1, 8), (16, 8)):
        bn, bm = red.blocking.block_shape(None, R, 200_000, 200_000, itemsize, torch.device("cpu"), temporaries=3)
        assert 3 * R * bn * bm * itemsize <= red.config.memory_budget
        assert R * bn * bm <= max(red.config.cpu_block_elements, 64 * 64)
        assert bn < 200_000 and bm < 200_000


# -- errors ----------------------------------------------------------------------------------------


def _xyw(R=2, N=5, M=6, d=2, dtype=torch.float64):
    x, y = clouds(R, N, M, d, dtype=dtype)
    return x, y, simplex(R, M, dtype=dtype)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, y, w: red.kernel_sum(x[0, :, 0], y, weights=w), ShapeError, r"x must have shape \(R, N, d\) or \(N, d\); received shape \(5,\)"),
        (lambda x, y, w: red.kernel_sum(x[..., :1], y, weights=w), ShapeError, r"x has d = 1 .* but y has d = 2"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w[:, :5]), ShapeError, r"weights has 5 entries per replica but there are M = 6"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w[None]), ShapeError, r"weights must have shape \(R, M\) or \(M,\)"),
        (lambda x, y, w: red.kernel_sum(x, y, torch.ones(2, 4, 1, dtype=torch.float64), w), ShapeError, r"values has 4 rows per replica but there are M = 6"),
        (lambda x, y, w: red.kernel_sum(x, y[:1].expand(3, 6, 2), weights=w), ShapeError, r"disagree on the number of replicas R \(x: R=2, y: R=3"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, block_size=0), ShapeError, r"block_size must be a positive int"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, block_size=(4, 5, 6)), ShapeError, r"block_size must be .* \(rows, cols\) pair"),
        (lambda x, y, w: red.kernel_sum(x[:, :0], y, weights=w), ShapeError, r"need at least one query.* N = 0"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, kernel="gauss"), StateError, r"unknown kernel 'gauss'; known kernels are 'gaussian', 'laplace'"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, bandwidth=0.0), StateError, r"bandwidth must be positive; received 0.0"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, bandwidth="wide"), StateError, r"bandwidth must be a real number; received 'wide'"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, gradient="yes"), StateError, r"gradient must be False, True or 'both'; received 'yes'"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w, gradient=1), StateError, r"gradient must be False, True or 'both'; received 1"),
        (lambda x, y, w: red.kernel_sum(x, y, torch.ones(6, 1, dtype=torch.float64), w, gradient=True), StateError, r"gradient=True .* takes no values; pass values=None"),
        (lambda x, y, w: red.kernel_sum(x, y.float(), weights=w), StateError, r"y has dtype torch.float32 but x has dtype torch.float64; convert them"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w.float()), StateError, r"weights has dtype torch.float32 but x has dtype torch.float64"),
        (lambda x, y, w: red.kernel_sum(x, y.to("meta"), weights=w), StateError, r"y is on meta but x is on cpu; move every argument to the same device"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w.to("meta")), StateError, r"weights is on meta but x is on cpu"),
        (lambda x, y, w: red.kernel_sum(x.long(), y, weights=w), StateError, r"x must be a floating-point tensor; received dtype torch.int64"),
        (lambda x, y, w: red.kernel_sum(x.numpy(), y, weights=w), StateError, r"x must be a torch.Tensor; received ndarray"),
        (lambda x, y, w: red.kernel_sum(x.requires_grad_(True), y, weights=w), StateError, r"x requires grad, but the streaming reduction records no autograd history"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w * 2), StateError, r"weights must sum to one in every replica .* replica 0 sums to 2\b.*w / w.sum\(-1, keepdim=True\), or put unnormalised per-point factors into values"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=torch.cat([w[:1], w[1:] * 1.001])), StateError, r"replica 1 sums to 1.001"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w - w.mean()), StateError, r"weights contain \d+ negative entries"),
        (lambda x, y, w: red.kernel_sum(x, y, weights=w.index_fill(1, torch.tensor([2]), math.nan)), StateError, r"weights contain 2 non-finite entries"),
        (lambda x, y, w: red.softmax_average(x, y, weights=w * 3), StateError, r"softmax_average: weights must sum to one .* or pass log_weights for an unnormalised per-point term"),
        (lambda x, y, w: red.softmax_average(x, y, weights=w, log_weights=w.log()), StateError, r"pass weights or log_weights, not both"),
        (lambda x, y, w: red.softmax_average(x, y, score="cosine"), StateError, r"unknown score 'cosine'; known scores are 'sqdist' and 'bilinear'"),
        (lambda x, y, w: red.softmax_average(x, y, scale=math.inf), StateError, r"scale must be finite; received inf"),
        (lambda x, y, w: red.softmax_average(x, y[..., :1]), ShapeError, r"queries have d = 2 .* but keys have d = 1"),
        (lambda x, y, w: red.softmax_average(x, y, log_weights=torch.full((6,), math.nan, dtype=torch.float64)), StateError, r"log_weights contain NaN; use −inf to exclude a point"),
        (lambda x, y, w: red.softmax_average(x, y.to("meta")), StateError, r"softmax_average: keys is on meta but queries is on cpu"),
        (lambda x, y, w: red.softmax_average(x.float(), y), StateError, r"softmax_average: keys has dtype torch.float64 but queries has dtype torch.float32"),
    ],
)
def test_errors_name_the_problem(call, error, message):
    x, y, w = _xyw()
    with pytest.raises(error, match=message):
        call(x, y, w)


def test_weight_check_accepts_float32_rounding_and_can_be_switched_off(monkeypatch):
    x, y, w = _xyw(M=6, dtype=torch.float32)
    w32 = torch.full((2, 6), 1 / 6, dtype=torch.float32)  # sums to 1 only up to float32 rounding
    red.kernel_sum(x, y, weights=w32)
    monkeypatch.setattr(red, "config", red.ReductionConfig(check_weights=False))
    S = red.kernel_sum(x, y, weights=w32 * 2)
    assert torch.allclose(S, 2 * red.kernel_sum(x, y, weights=w32))


# -- N = M = 200,000 without any N×M allocation --------------------------------------------------

BIG_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    from measureflow import reductions as red

    def status_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    N, d, h = 200_000, 2, 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, d, generator=g) * 4.0
    y = torch.rand(N, d, generator=g) * 4.0
    red.kernel_sum(x[:64], y[:64], bandwidth=h)  # compile (a cache hit when the tests ran before)
    try:  # reset the high-water mark to the current RSS, so VmHWM below is this call's own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = True
    except OSError:
        exact = False  # VmHWM then includes earlier peaks: an over-estimate, never an under-estimate
    before = status_kib("VmRSS")
    start = time.perf_counter()
    S = red.kernel_sum(x, y, bandwidth=h)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM") - before
    rows = torch.arange(0, N, N // 50)
    x64, y64 = x[rows].double(), y.double()
    ref = torch.exp(-((x64[:, None, :] - y64[None, :, :]) ** 2).sum(-1) / (2 * h * h)).mean(-1)
    err = ((S[rows].double() - ref).abs().max() / ref.abs().max()).item()
    print(json.dumps({"peak_kib": peak, "exact": exact, "err": err, "shape": list(S.shape),
                      "dtype": str(S.dtype), "seconds": seconds, "fused": "kernel_sum" in str(list(red.fused.kernels))}))
    """
)


@pytest.mark.slow
def test_200k_points_stream_in_bounded_memory(tmp_path):
    """N = M = 200,000, d = 2, float32: 4·10¹⁰ pairs with under 1 GiB of extra peak memory.

    Why a fresh subprocess and VmHWM: torch's CPU tensors live in malloc/mmap pages that
    tracemalloc does not see, whereas the kernel's resident-set high-water mark counts every page
    touched; a fresh process keeps other tests' memory out of the figure, and resetting the mark
    through /proc/self/clear_refs right before the call makes it that call's own peak. One N×M
    float32 matrix would be 160 GB, even one N × 4,096 column block 3.3 GB: the bound rules out
    both. The fused float32 path (polynomial exp) is the cheapest full pass, and it is the one
    that streams by construction; the eager path's block sizes are checked against the budget in
    test_eager_blocks_respect_the_memory_budget.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status (Linux) to read the resident-set high-water mark")
    if not HAS_COMPILER:
        pytest.skip("torch.compile on CPU needs a C++ compiler; none found")
    env = dict(os.environ, MEASUREFLOW_COMPILE="1")
    proc = subprocess.run(
        [sys.executable, "-c", BIG_SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["fused"], "the fused path did not run"
    assert result["shape"] == [200_000] and result["dtype"] == "torch.float32"
    assert result["peak_kib"] < 1024 * 1024, f"peak extra memory {result['peak_kib'] / 1024:.0f} MiB ≥ 1 GiB"
    # float32 sums of 200,000 terms: 8-lane accumulators over ~4,100-column blocks, then ~49 block
    # additions, at worst (4100/8 + 49)·ε₃₂ ≈ 3.4·10⁻⁵, plus 2.2·10⁻⁷ for the exp: 10⁻⁴ has margin.
    assert result["err"] < 1e-4, result
