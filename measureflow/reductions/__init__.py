"""Streaming kernel sums and softmax-weighted averages: the engine's numerical spine.

Two reductions between query points xᵢ (N of them) and source points yⱼ (M of them), batched over
R replicas (DESIGN.md, "The numerical spine"; weights follow MATH.md §0: a probability vector per
replica, uniform = 1/M):

* :func:`kernel_sum`      Sᵢ = Σⱼ wⱼ k(xᵢ, yⱼ) vⱼ   and its gradient Gᵢ = Σⱼ wⱼ ∇ₓk(xᵢ, yⱼ)
  (:func:`measure_kernel_sum` for weights of any total mass);
* :func:`softmax_average` Σⱼ softmaxⱼ(s(qᵢ, kⱼ) + log wⱼ) vⱼ   and its log-sum-exp.

Every field that needs one of them calls these functions, so a speed-up here lands everywhere.
Memory stays O((N + M)·d + block²) per replica on any device: the N×M matrix is never formed.

Two execution paths compute the same numbers:

* **fused** (``torch.compile``): one generated loop nest per (replica, column block) evaluates
  distance, kernel and every weighted sum in registers, without writing any N×M temporary. Used for
  d ≤ ``config.fused_max_dim`` and named kernels when compiling is allowed (``MEASUREFLOW_COMPILE``,
  see :class:`ReductionConfig`). One compile serves every N, M and R (shapes are symbolic and the
  replica loop runs in Python), and torch's on-disk caches, kept in a lasting directory
  (:mod:`.compile_cache`), hand it to later processes: a machine pays it once per static
  configuration (reduction, kernel or score, d, number of value channels, gradient or not, dtype,
  serial or parallel) and torch version; a fresh process only traces and loads it. float32 on CPU uses a
  polynomial exp accurate to ~2·10⁻⁷ relative (float32 rounding), otherwise ``torch.exp``; the
  CPU code is compiled with FMA contraction.
* **blocked eager**: (bn × bm) blocks sized from a memory budget, GEMMs for the value sums, the
  exp evaluated in place, a streaming max/rescale across column blocks for the softmax.

Accuracy notes (why the code forms differences where it does): for d ≤ ``config.direct_max_dim``,
and always for the non-smooth kernels ("laplace", "energy"), squared distances are formed from
explicit differences, so k(x, x) is exact and near-diagonal values keep full relative accuracy
(MMD² differences of nearly equal sums need this; for r = |x − y| the GEMM identity would leave an
error of order √ε·|x| at r = 0). Otherwise the eager path uses the GEMM identity
|x − y|² = |x|² + |y|² − 2⟨x, y⟩ after centring both point sets on the sources' mean; its absolute
error is about ε·(|x − c|² + |y − c|²)/h² in the exponent.

Neither reduction records autograd history (that would keep every block alive); use
``gradient=True`` for ∇ₓ of a kernel sum.

Layout (one job a module): :mod:`.settings` (:class:`ReductionConfig` and :data:`config`),
:mod:`.arguments` (argument checks), :mod:`.blocking` (eager block sizes, explicit squared
distances), :mod:`.kernel_sums` and :mod:`.softmax` (the two reductions and their eager paths),
:mod:`.cpu_attention` (softmax averages on torch's CPU attention kernel), :mod:`.fused` and
:mod:`.fused_kernels` (the compiled path), :mod:`.compile_cache` (where its compiled code
persists); :mod:`.sinkhorn` (log-domain Sinkhorn on the softmax
average: OT_ε potentials and the debiased divergence, which fields import from here, never from a
plugin).
"""

from __future__ import annotations

import sys
import types

from . import settings
from .kernel_sums import KERNELS, kernel_sum, measure_kernel_sum
from .settings import ReductionConfig
from .sinkhorn import SinkhornDivergence, sinkhorn_potentials, symmetric_potential
from .softmax import softmax_average

__all__ = [
    "kernel_sum",
    "measure_kernel_sum",
    "softmax_average",
    "KERNELS",
    "ReductionConfig",
    "config",
    "sinkhorn_potentials",
    "symmetric_potential",
    "SinkhornDivergence",
]


class _Package(types.ModuleType):
    """This package as a module whose ``config`` is :data:`settings.config` itself.

    Every module reads the knobs as ``settings.config`` at call time, so reading
    ``measureflow.reductions.config`` and assigning a new :class:`ReductionConfig` to it (as tests and
    scripts do) both reach the one instance the reductions use.
    """

    @property
    def config(self) -> ReductionConfig:
        return settings.config

    @config.setter
    def config(self, value: ReductionConfig) -> None:
        settings.config = value


sys.modules[__name__].__class__ = _Package
