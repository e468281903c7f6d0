"""Peak memory of a gradient through a run, against the number of steps: backprop against the adjoint.

A terminal loss |x(1)|² of N particles moved by a learned MLP field (2 → 64 → 64 → 2, tanh, float32)
through ``steps`` RK4 steps; ``torch.autograd.grad`` of it with respect to the network's weights, with
``Simulation(gradient="backprop")`` and ``gradient="adjoint"`` (MATH §15.5), beside torchdiffeq's
``odeint`` and ``odeint_adjoint`` on the same network and grid when torchdiffeq is importable. Each (mode, steps) pair runs
in a fresh process and reports its peak resident set size (``ru_maxrss``), so the figures are the CPU's
own; on a CUDA device the peak allocated memory is reported as well. Backprop keeps every stage of every
step for the backward pass (memory grows linearly with the steps); the adjoint keeps only the state at
the step ends it replays (flat up to those N·d numbers per step).

    python benchmarks/bench_gradient_memory.py            # N = 10⁴, steps 25, 50, 100, 200
    python benchmarks/bench_gradient_memory.py --quick    # N = 2000, steps 25, 50, 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import add_standard_arguments, load_line, prepare_machine  # noqa: E402


def one_run(mode: str, steps: int, n: int, device: str) -> dict:
    """Peak memory of one gradient through a run (called in a fresh process)."""
    from torch import nn

    import measureflow
    from measureflow import Particles, Simulation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)).to(device)

    class Velocity(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t):
            time = torch.full_like(x[..., :1], float(t))
            return self.net(torch.cat([x, time], dim=-1))

    x = torch.randn(n, 2, device=device)
    velocity = Velocity()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode in ("odeint", "odeint_adjoint"):
        import torchdiffeq

        class Func(nn.Module):  # torchdiffeq's right-hand side f(t, y)
            def __init__(self):
                super().__init__()
                self.velocity = velocity

            def forward(self, t, y):
                return self.velocity(y, t)

        solve = getattr(torchdiffeq, mode)
        end_x = solve(Func(), x, torch.tensor([0.0, 1.0], device=device), method="rk4",
                      options={"step_size": 1.0 / steps})[-1]
    else:
        end_x = Simulation(Particles(x[None]), measureflow.field("learned", model=velocity), "rk4", t1=1.0,
                           steps=steps, gradient=mode, progress=False, blowup=None).run().state.x
    grads = torch.autograd.grad((end_x ** 2).sum(-1).mean(), list(model.parameters()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"mode": mode, "steps": steps, "n": n, "peak_rss_mib": peak / 1024, "growth_mib": (peak - before) / 1024}
    if device.startswith("cuda"):
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_standard_arguments(parser, "gradient_memory", "N = 2000 and up to 100 steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "STEPS", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(one_run(args.child[0], int(args.child[1]), int(args.child[2]), args.device)))
        return 0
    env = prepare_machine(args)
    n = 2000 if args.quick else 10_000
    steps_list = (25, 50, 100) if args.quick else (25, 50, 100, 200)
    print(f"device {args.device}, N = {n}; {load_line(env)}")
    try:
        import torchdiffeq  # noqa: F401 - the peer, when installed (pip install --no-deps torchdiffeq)
        modes = ("backprop", "odeint", "adjoint", "odeint_adjoint")
    except ImportError:
        modes = ("backprop", "adjoint")
    rows = []
    for steps in steps_list:
        for mode in modes:
            done = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--device", args.device,
                                   "--child", mode, str(steps), str(n)], capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {mode:14s} steps {steps:4d}: peak RSS {row['peak_rss_mib']:8.1f} MiB "
                  f"(+{row['growth_mib']:7.1f} MiB during the run and its gradient)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    print(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
