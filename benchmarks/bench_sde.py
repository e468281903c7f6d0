"""SDE sampling through one MLP drift: measureflow's SDE solvers against torchsde's ``sdeint``.

dX = f_θ(X, t) dt + g dW, f_θ a fixed random VelocityMLP (d = 2), g = 0.5, 10⁴ particles, t ∈ [0, 1].
For each pair of comparable methods (Euler–Maruyama ↔ torchsde "euler"; stochastic Heun ↔ torchsde
"heun" (Stratonovich, equal to Itô for additive noise); SRA1 ↔ torchsde "srk" (additive noise)), it
reports the time per step and the strong error E|X_1^h − X_1^ref| against the same method at 16× the
steps on the same Brownian path (measureflow: a BrownianTree; torchsde: its BrownianInterval).

    python benchmarks/bench_sde.py [--n 10000] [--steps 64] [--device cpu]

torchsde is optional (``pip install torchsde``); without it only measureflow's numbers are printed.
Record ``uptime`` with the numbers: timings on a loaded machine are not comparable.
"""

from __future__ import annotations

import argparse
import time

import torch

import measureflow
from measureflow import Particles
from measureflow.fields import Field
from measureflow.integrators import BrownianTree, Stepper
from measureflow.training import VelocityMLP

NOISE = 0.5


class MLPDrift(Field):
    name = "mlp_drift"

    def __init__(self, net):
        self.net = net

    def velocity(self, t, x, state):
        with torch.no_grad():
            return self.net(x, t)

    def diffusion(self, t):
        return NOISE


def ours(method, net, x0, steps, tree):
    field = MLPDrift(net)
    stepper = Stepper(measureflow.integrator(method), field, Particles(x0[None]), noise=tree)
    state = Particles(x0[None].clone())
    t0 = time.perf_counter()
    for k in range(steps):
        state = stepper.advance(state, k / steps, (k + 1) / steps)
    if x0.is_cuda:
        torch.cuda.synchronize()
    return state.x[0], (time.perf_counter() - t0) / steps


def theirs(method, net, x0, steps, bm):
    import torchsde

    class SDE(torch.nn.Module):
        noise_type = "additive"
        sde_type = "stratonovich" if method == "heun" else "ito"

        def f(self, t, y):
            with torch.no_grad():
                return net(y, float(t))

        def g(self, t, y):
            return torch.full((*y.shape, 1), NOISE, dtype=y.dtype, device=y.device).expand(*y.shape, 1) * \
                torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)[None]

    ts = torch.tensor([0.0, 1.0], dtype=x0.dtype, device=x0.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = torchsde.sdeint(SDE(), x0, ts, method=method, dt=1.0 / steps, bm=bm)
    if x0.is_cuda:
        torch.cuda.synchronize()
    return out[-1], (time.perf_counter() - t0) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = VelocityMLP(2, hidden=64, depth=3).to(device=device, dtype=torch.float64).eval()
    x0 = torch.randn(args.n, 2, dtype=torch.float64, device=device)
    fine = 16 * args.steps
    tree = BrownianTree(0.0, 1.0, (fine - 1).bit_length(), seeds=(1,), device=device)
    try:
        import torchsde
    except ImportError:
        torchsde = None
    pairs = [("euler_maruyama", "euler"), ("stochastic_heun", "heun"), ("sra", "srk")]
    print(f"n = {args.n}, steps = {args.steps}, reference steps = {fine}, device = {device}")
    print(f"{'method':18s} {'ms/step':>9s} {'strong err':>11s}   {'torchsde':10s} {'ms/step':>9s} {'strong err':>11s}")
    for mine, other in pairs:
        ref, _ = ours(mine, net, x0, fine, tree)
        x, per = ours(mine, net, x0, args.steps, tree)
        err = float((x - ref).abs().mean())
        line = f"{mine:18s} {1e3 * per:9.3f} {err:11.3e}"
        if torchsde is not None:
            bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(args.n, 2), dtype=torch.float64, device=device,
                                           levy_area_approximation="space-time", entropy=1)
            ref_t, _ = theirs(other, net, x0, fine, bm)
            xt, per_t = theirs(other, net, x0, args.steps, bm)
            line += f"   {other:10s} {1e3 * per_t:9.3f} {float((xt - ref_t).abs().mean()):11.3e}"
        print(line)


if __name__ == "__main__":
    main()
