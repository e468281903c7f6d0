"""softmax_average(score="bilinear"), and score="sqdist" in float64, on torch's fused CPU attention kernel: the
numbers against the dense formula and the blocked path, when that path is taken, its memory, and the fallback
when the kernel refuses."""

import gc
import math
import warnings

import pytest
import torch

from measureflow import reductions as red

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("small_reductions")


def dense(q, k, v, logw, scale):
    """softmax(scale·q kᵀ + log w)·v and its log-sum-exp, with the N×M matrix in float64."""
    s = scale * torch.einsum("...nd,...md->...nm", q.double(), k.double()) + logw.double()[..., None, :]
    return torch.softmax(s, -1) @ v.double(), torch.logsumexp(s, -1)


def data(R, N, M, d, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(R, N, d, generator=g, dtype=F64)
    k = torch.randn(R, M, d, generator=g, dtype=F64)
    v = torch.randn(R, M, C, generator=g, dtype=F64)
    w = torch.rand(R, M, generator=g, dtype=F64) + 0.05
    return q.to(dtype), k.to(dtype), v.to(dtype), (w / w.sum(-1, keepdim=True)).to(dtype)


@pytest.fixture
def spy(monkeypatch):
    """Record whether each call went through the attention kernel."""
    calls = []
    real = red.cpu_attention.bilinear_softmax

    def wrapped(*args):
        calls.append("kernel")
        return real(*args)

    monkeypatch.setattr(red.cpu_attention, "bilinear_softmax", wrapped)
    return calls


@pytest.mark.parametrize("dtype, tol", [(F64, 1e-13), (torch.float32, 2e-6)])
@pytest.mark.parametrize("d, C", [(3, 3), (2, 5), (6, 2), (64, 64)])
def test_kernel_path_matches_the_dense_formula(spy, dtype, tol, d, C):
    """Weights, log-weights and uniform weights; values narrower, wider and as wide as the scores' space
    (zero padding); both signs of the scale. Tolerance: rounding of the dtype (relative to max |out|)."""
    R, N, M = 2, 70, 90
    q, k, v, w = data(R, N, M, d, C, dtype, seed=d + C)
    for scale in (0.7 / math.sqrt(d), -1.3 / math.sqrt(d)):
        for kind in ("weights", "log_weights", None):
            kwargs = {"weights": w} if kind == "weights" else {"log_weights": 2 * w.log()} if kind else {}
            logw = w.log() if kind == "weights" else 2 * w.log() if kind else torch.full_like(w, -math.log(M))
            avg, lse = red.softmax_average(q, k, v, score="bilinear", scale=scale, return_logsumexp=True, **kwargs)
            ref_avg, ref_lse = dense(q, k, v, logw, scale)
            assert avg.dtype == dtype and avg.shape == (R, N, C) and lse.shape == (R, N)
            assert float((avg.double() - ref_avg).abs().max()) < tol * float(ref_avg.abs().max())
            assert float((lse.double() - ref_lse).abs().max()) < tol * max(1.0, float(ref_lse.abs().max()))
    assert spy == ["kernel"] * 6


def test_broadcasting_unbatched_calls_and_averaging_the_keys(spy):
    q, k, v, w = data(3, 40, 50, 4, 2, F64, seed=1)
    # shared queries and values (2-D) against per-replica keys
    avg = red.softmax_average(q[0], k, v[0], w, score="bilinear", scale=0.5)
    ref, _ = dense(q[0].expand(3, -1, -1), k, v[0].expand(3, -1, -1), w.log(), 0.5)
    assert avg.shape == (3, 40, 2) and torch.allclose(avg, ref, atol=1e-14)
    # one replica, no R axis anywhere; values=None averages the keys
    avg, lse = red.softmax_average(q[0], k[0], score="bilinear", return_logsumexp=True)
    ref, ref_lse = dense(q[0], k[0], k[0], torch.full((50,), -math.log(50), dtype=F64), 1.0)
    assert avg.shape == (40, 4) and lse.shape == (40,)
    assert torch.allclose(avg, ref, atol=1e-14) and torch.allclose(lse, ref_lse, atol=1e-14)
    assert spy == ["kernel", "kernel"]


def test_extreme_scores_and_excluded_points(spy):
    """Scores of ±10³ where a naive exponential overflows or underflows, with every seventh key excluded by
    log w = −inf and the dominant key of each query in the last keys: the streamed maximum handles them."""
    R, N, M, d = 2, 64, 300, 2
    q, k, v, w = data(R, N, M, d, 3, F64, seed=2)
    order = (k - q.mean(1, keepdim=True)).norm(dim=-1).argsort(dim=1, descending=True)
    k = torch.gather(k, 1, order[..., None].expand(R, M, d))
    logw = w.log()
    logw[:, ::7] = -math.inf
    for scale in (1e3, -1e3):
        naive = torch.exp(scale * torch.einsum("rnd,rmd->rnm", q, k) + logw[:, None, :])
        assert bool((naive.sum(-1) == 0).any() or torch.isinf(naive).any())
        avg, lse = red.softmax_average(q, k, v, log_weights=logw, score="bilinear", scale=scale, return_logsumexp=True)
        ref_avg, ref_lse = dense(q, k, v, logw, scale)
        assert torch.isfinite(avg).all() and torch.isfinite(lse).all()
        assert torch.allclose(avg, ref_avg, rtol=1e-12, atol=1e-12)
        assert torch.allclose(lse, ref_lse, rtol=1e-13)
    assert spy == ["kernel", "kernel"]


def test_same_numbers_as_the_blocked_path_and_as_sdpa(spy):
    """Which path runs: the kernel for bilinear scores with block_size=None on CPU float32/float64; an
    explicit block_size, the sqdist score and other dtypes keep the blocked paths. Both paths agree to
    rounding, and with uniform weights the kernel's average is torch's scaled_dot_product_attention."""
    q, k, v, w = data(1, 300, 400, 16, 16, torch.float32, seed=3)
    fast = red.softmax_average(q, k, v, w, score="bilinear", scale=0.25)
    blocked = red.softmax_average(q, k, v, w, score="bilinear", scale=0.25, block_size=(64, 128))
    assert spy == ["kernel"]
    assert torch.allclose(fast, blocked, atol=2e-6)
    red.softmax_average(q, k, v, w, score="sqdist", scale=0.25)
    red.softmax_average(q.bfloat16(), k.bfloat16(), v.bfloat16(), score="bilinear")
    assert spy == ["kernel"]
    uniform = red.softmax_average(q, k, v, score="bilinear", scale=0.25)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], scale=0.25)[:, 0]
    assert torch.allclose(uniform, sdpa, atol=2e-6)


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def test_memory_stays_linear_in_the_points():
    """N = M = 12,000 with per-point log-weights: an N×M float32 matrix (mask or scores) would be 550 MiB;
    the call's extra resident memory must stay under 32 MiB (measured ~2 MiB: the mask is a broadcast view).
    Measured through the kernel's resident-set high-water mark, reset first (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the resident-set high-water mark here")
    N, d = 12_000, 4
    q, k, v, w = data(1, N, N, d, d, torch.float32, seed=4)
    logw = w.log()
    red.softmax_average(q[:, :64], k, v, log_weights=logw, score="bilinear")
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    avg = red.softmax_average(q, k, v, log_weights=logw, score="bilinear")
    peak = _status_kib("VmHWM")
    assert avg.shape == (1, N, d)
    assert (peak - before) * 1024 < 32 * 2**20


def test_a_refusing_kernel_warns_once_and_the_blocked_path_serves(monkeypatch, spy):
    monkeypatch.setattr(red.cpu_attention, "failure", None)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported here")

    monkeypatch.setattr(red.cpu_attention, "attention_op", lambda: refuse)
    q, k, v, w = data(2, 30, 40, 3, 3, F64, seed=5)
    expected, _ = dense(q, k, v, w.log(), 0.8)
    with pytest.warns(RuntimeWarning, match="attention kernel refused .*unsupported here"):
        avg = red.softmax_average(q, k, v, w, score="bilinear", scale=0.8)
    assert torch.allclose(avg, expected, atol=1e-13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(red.softmax_average(q, k, v, w, score="bilinear", scale=0.8), expected, atol=1e-13)
    assert spy == ["kernel"]  # the failure is remembered: the second call does not try again
    monkeypatch.setattr(red.cpu_attention, "attention_op", lambda: None)
    monkeypatch.setattr(red.cpu_attention, "failure", None)
    assert torch.allclose(red.softmax_average(q, k, v, w, score="bilinear", scale=0.8), expected, atol=1e-13)
    assert spy == ["kernel"]  # a torch without the kernel never reaches it


@pytest.mark.parametrize("eps", [1.0, 0.05])
def test_sqdist_float64_through_the_kernel_matches_dense_and_the_direct_path(spy, eps):
    # −s|q − k|² = 2s⟨q, k⟩ − s|k|² − s|q|² after centring on the keys' mean: float64 keeps the
    # result within a few hundred ulps of the O(s·|x − c|²) scores (here s ≤ 20, |x − c|² ≲ 30: ≤ 1e-11).
    q, k, v, w = data(2, 300, 400, 2, 3, F64, 11)
    q, k = q + 3.0, k + 3.5  # off-centre, as particles far from the origin are
    w[:, :7] = 0.0  # excluded points (−inf log-weights)
    w = w / w.sum(-1, keepdim=True)
    s = 1.0 / eps
    sq = -s * ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1) + torch.log(w)[:, None, :]
    ref_avg, ref_lse = torch.softmax(sq, -1) @ v, torch.logsumexp(sq, -1)
    avg, lse = red.softmax_average(q, k, v, w, score="sqdist", scale=s, return_logsumexp=True)
    assert spy == ["kernel"]
    assert (avg - ref_avg).abs().max() <= 1e-11 and (lse - ref_lse).abs().max() <= 1e-11 * s
    direct = red.softmax_average(q, k, v, w, score="sqdist", scale=s, return_logsumexp=True, block_size=128)
    assert len(spy) == 1  # explicit blocks take the direct path
    assert (avg - direct[0]).abs().max() <= 1e-11 and (lse - direct[1]).abs().max() <= 1e-11 * s
    # Uniform weights and the posterior mean (values = keys).
    mean, lse_u = red.softmax_average(q, k, score="sqdist", scale=s, return_logsumexp=True)
    sq_u = -s * ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1) - math.log(k.shape[1])
    assert (mean - torch.softmax(sq_u, -1) @ k).abs().max() <= 1e-11
    assert (lse_u - torch.logsumexp(sq_u, -1)).abs().max() <= 1e-11 * s
