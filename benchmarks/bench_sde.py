"""SDE sampling through one MLP drift: measureflow's SDE solvers against torchsde's ``sdeint``.

dX = f_θ(X, t) dt + g dW, f_θ a fixed random VelocityMLP (d = 2), g = 0.5, 10⁴ particles, t ∈ [0, 1].
For each pair of comparable methods (Euler–Maruyama ↔ torchsde "euler"; stochastic Heun ↔ torchsde
"heun" (Stratonovich, equal to Itô for additive noise); SRA1 ↔ torchsde "srk" (additive noise)), it
reports the time per step and the strong error E|X_1^h − X_1^ref| against the same method at 16× the
steps on the same Brownian path (measureflow: a BrownianTree; torchsde: its BrownianInterval).

    python benchmarks/bench_sde.py [--n 10000] [--steps 64] [--device cpu] [--quick] [--threads 1] [--out STEM]

torchsde is optional (``pip install torchsde``); without it only measureflow's numbers are printed.
The two sides are timed in turns in one process; the result (``--out``, default under ~/.cache) records
torch threads, load average and effective cores at the start (``benchkit``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchkit import add_standard_arguments, alternate, paired_ratio, prepare_machine

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_standard_arguments(parser, "sde", "n = 2000, 16 steps, 3 rounds")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed integrations per side, in turns")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.steps, args.rounds = 2000, 16, 3
    env = prepare_machine(args)
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
    print(f"n = {args.n}, steps = {args.steps}, reference steps = {fine}, device = {device}, "
          f"median of {args.rounds} rounds, sides in turns")
    print(f"{'method':18s} {'ms/step':>9s} {'strong err':>11s}   {'torchsde':10s} {'ms/step':>9s} {'strong err':>11s}"
          f" {'theirs/ours':>11s}")
    rows = []
    for mine, other in pairs:
        ref, _ = ours(mine, net, x0, fine, tree)
        sides = {"measureflow": lambda m=mine: ours(m, net, x0, args.steps, tree)}
        if torchsde is not None:
            bm = torchsde.BrownianInterval(t0=0.0, t1=1.0, size=(args.n, 2), dtype=torch.float64, device=device,
                                           levy_area_approximation="space-time", entropy=1)
            ref_t, _ = theirs(other, net, x0, fine, bm)
            sides["torchsde"] = lambda o=other, b=bm: theirs(o, net, x0, args.steps, b)
        times = alternate(sides, args.rounds)
        x, _ = sides["measureflow"]()
        per = statistics.median(t["wall"] for t in times["measureflow"]) / args.steps
        row = {"method": mine, "ms_per_step": 1e3 * per, "strong_error": float((x - ref).abs().mean())}
        line = f"{mine:18s} {1e3 * per:9.3f} {row['strong_error']:11.3e}"
        if torchsde is not None:
            xt, _ = sides["torchsde"]()
            per_t = statistics.median(t["wall"] for t in times["torchsde"]) / args.steps
            row.update(peer=other, peer_ms_per_step=1e3 * per_t, peer_strong_error=float((xt - ref_t).abs().mean()),
                       ratio=paired_ratio(times, "torchsde", "measureflow"))
            line += f"   {other:10s} {1e3 * per_t:9.3f} {row['peer_strong_error']:11.3e} {row['ratio']:11.2f}"
        rows.append(row)
        print(line, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    print(f"written: {args.out.with_suffix('.json')}")

if __name__ == "__main__":
    main()
