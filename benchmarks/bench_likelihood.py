"""Likelihoods and gradients through a run: measureflow against the torchdiffeq recipes users write today.

Two comparisons, the same MLP field v_θ(x, t) (``VelocityMLP``-shaped: (x, t) → hidden → hidden → x,
tanh, float32) on both sides:

* **log-likelihood** of n points: integrate x from t = 0 to 1 with the log-density channel
  (``measureflow.likelihood``, exact trace and Hutchinson with one Rademacher probe) against an
  FFJORD-style augmented ODE ``torchdiffeq.odeint(func, (x, logp), t)`` whose ``func`` computes the
  trace by d autograd passes (exact) or by one vector–Jacobian product (Hutchinson), both with
  ``dopri5`` at the same rtol = atol; reported: wall time, the max difference between the two exact
  log-likelihoods (equal accuracy), and peak memory (CUDA only);
* **gradient of a terminal loss** L = mean |x(1)|² through 100 RK4 steps, N points, with respect to
  the MLP's weights: ``Simulation(..., gradient="backprop" | "adjoint")`` against
  ``torchdiffeq.odeint`` / ``odeint_adjoint`` (method ``rk4``, the same grid); wall time, peak memory
  (CUDA), and the max relative difference of the gradients.

torchdiffeq is optional: ``pip install torchdiffeq`` (or put it on PYTHONPATH). Every method runs
once untimed (warm-up: allocator, lazy imports), then ``--repeats`` times with the two libraries
alternating, and the best time is kept, so a load spike on a shared machine hits both sides alike.
Each ratio compares like with like: measureflow exact / Hutchinson against torchdiffeq exact /
Hutchinson, ``backprop`` against ``odeint`` and ``adjoint`` against ``odeint_adjoint`` (> 1: measureflow
faster). The load average and the torch thread count are printed with the results.

    python benchmarks/bench_likelihood.py                       # n = 10⁴, d = 2 and 16
    python benchmarks/bench_likelihood.py --quick --device cpu  # n = 10³
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

import measureflow
from measureflow import Particles, Simulation


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, d))

    def forward(self, x, t):
        tt = torch.full_like(x[..., :1], float(t.detach()) if torch.is_tensor(t) else float(t))
        return self.net(torch.cat([x, tt], dim=-1))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best(fns, device, repeats):
    """{name: (best wall time, peak MiB, result, best CPU time)} of callables run once untimed, then
    ``repeats`` times each, alternating. CPU time (this process) is less sensitive than wall time to
    other processes sharing the cores."""
    out = {}
    for name, fn in fns.items():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            cpu0 = time.process_time()
            res, wall, peak = _timed(fn, device)
            cpu = time.process_time() - cpu0
            prev = out.get(name)
            if prev:
                wall, peak, cpu = min(wall, prev[0]), max(peak, prev[1]), min(cpu, prev[3])
            out[name] = (wall, peak, res, cpu)
    return out


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return out, time.perf_counter() - start, peak


def likelihood_case(d, n, device, tol, repeats=3):
    from torchdiffeq import odeint

    torch.manual_seed(0)
    model = MLP(d).to(device)
    x = torch.randn(n, d, device=device)
    field = measureflow.field("learned", model=model)
    solver = measureflow.integrator("dopri5", rtol=tol, atol=tol)
    fns = {}
    for mode in ("exact", "hutchinson"):
        fns[f"measureflow {mode}"] = (lambda mode=mode: measureflow.likelihood(
            field, x, integrator=solver, log_density=mode, batch_size=n, progress=False).log_prob)

    def ffjord(hutchinson: bool):
        eps = torch.sign(torch.randn_like(x))

        def func(t, state):
            z, _ = state
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                v = model(z, t)
                if hutchinson:
                    (g,) = torch.autograd.grad((v * eps).sum(), z)
                    div = (g * eps).sum(-1)
                else:
                    div = sum(torch.autograd.grad(v[:, k].sum(), z, retain_graph=True)[0][:, k] for k in range(d))
            return v.detach(), -div.detach()

        zs, ls = odeint(func, (x, torch.zeros(n, device=device)), torch.tensor([0.0, 1.0], device=device),
                        method="dopri5", rtol=tol, atol=tol)
        z1, l1 = zs[-1], ls[-1]
        return -0.5 * (z1 * z1).sum(-1) - 0.5 * d * torch.log(torch.tensor(2 * torch.pi)) - l1

    for mode, hut in (("exact", False), ("hutchinson", True)):
        fns[f"torchdiffeq {mode}"] = lambda hut=hut: ffjord(hut)
    rows = _best(fns, device, repeats)
    agree = float((rows["measureflow exact"][2] - rows["torchdiffeq exact"][2]).abs().max())
    return rows, agree


def gradient_case(n, device, steps=100, d=2, repeats=3):
    from torchdiffeq import odeint, odeint_adjoint

    torch.manual_seed(1)
    model = MLP(d).to(device)
    x = torch.randn(n, d, device=device)
    params = list(model.parameters())
    fns = {}
    for mode in ("backprop", "adjoint"):
        def ours(mode=mode):
            end = Simulation(Particles(x[None]), measureflow.field("learned", model=model), "rk4", t1=1.0,
                             steps=steps, gradient=mode, progress=False, blowup=None).run()
            return torch.autograd.grad((end.state.x ** 2).sum(-1).mean(), params)

        fns[f"measureflow {mode}"] = ours

    class Func(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, t, z):
            return self.model(z, t)

    func = Func()
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device)
    for name, solve in (("odeint", odeint), ("odeint_adjoint", odeint_adjoint)):
        def theirs(solve=solve):
            z1 = solve(func, x, grid[[0, -1]], method="rk4", options={"step_size": 1.0 / steps})[-1]
            return torch.autograd.grad((z1 ** 2).sum(-1).mean(), params)

        fns[f"torchdiffeq {name}"] = theirs
    # Alternate each of ours with its peer.
    order = ("measureflow backprop", "torchdiffeq odeint", "measureflow adjoint", "torchdiffeq odeint_adjoint")
    rows = _best({k: fns[k] for k in order}, device, repeats)
    ref = rows["torchdiffeq odeint"][2]
    diffs = {k: max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(v[2], ref)) for k, v in rows.items()}
    return rows, diffs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="n = 10³ instead of 10⁴")
    parser.add_argument("--tol", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (best kept)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = 1000 if args.quick else 10_000
    print(f"device {device}, n = {n}, torch threads {torch.get_num_threads()}, best of {args.repeats}, "
          f"load average {os.getloadavg()}")
    for d in (2, 16):
        rows, agree = likelihood_case(d, n, device, args.tol, args.repeats)
        print(f"\nlog-likelihood, d = {d}, dopri5 tol {args.tol:g} (exact log p agree to {agree:.2e}):")
        for name, (wall, peak, _, cpu) in rows.items():
            peer = rows["torchdiffeq " + name.split()[1]]
            print(f"  {name:24s} {wall:8.3f} s  peak {peak:8.1f} MiB  (torchdiffeq / this: {peer[0] / wall:.2f} wall, "
                  f"{peer[3] / cpu:.2f} CPU)")
    rows, diffs = gradient_case(n, device, repeats=args.repeats)
    print("\ngradient of mean |x(1)|² through 100 RK4 steps (relative difference to odeint's gradient):")
    peers = {"measureflow backprop": "torchdiffeq odeint", "measureflow adjoint": "torchdiffeq odeint_adjoint"}
    for name, (wall, peak, _, cpu) in rows.items():
        peer = rows[peers.get(name, name)]
        print(f"  {name:26s} {wall:8.3f} s  peak {peak:8.1f} MiB  diff {diffs[name]:.1e}  (torchdiffeq / this: "
              f"{peer[0] / wall:.2f} wall, {peer[3] / cpu:.2f} CPU)")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
