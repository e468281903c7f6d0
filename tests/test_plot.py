"""Pictures: every function writes a real image, reads only what it needs, and draws the right geometry."""

from __future__ import annotations

import math
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import measureflow  # noqa: E402
from measureflow import plot  # noqa: E402
from measureflow.fields import Field  # noqa: E402
from measureflow.io import H5MDWriter, MemoryWriter, RunInfo, Series, Snapshot, Trajectory, TrajectoryFile  # noqa: E402
from measureflow.plot.common import particle_subset  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------
# the trajectory protocol implemented over numpy arrays, as a user's own class would


class CountingFrames:
    """Frames (F, ...) that record which frames each read touches, like a frame-at-a-time file reader."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.reads = []

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        first = key[0] if isinstance(key, tuple) else key
        self.reads.extend(np.atleast_1d(np.arange(self.shape[0])[first]).tolist())
        return self.data[key]


class ArrayTrajectory(Trajectory):
    def __init__(self, kind, times, *, positions=None, mean=None, cov=None, weights=None, observables=None,
                 parameters=None):
        self._kind = kind
        self._times = np.asarray(times, dtype=float)
        self._steps = np.arange(len(self._times))
        self._positions = None if positions is None else CountingFrames(positions)
        self._means, self._covs = mean, cov
        self._weights = weights
        data = positions if positions is not None else mean
        self._shape = (data.shape[1], positions.shape[2] if positions is not None else 0, data.shape[-1])
        self._observables = {
            name: Series(name, self._steps, self._times, values) for name, values in (observables or {}).items()
        }
        self._parameters = parameters if parameters is not None else {
            "field": {"name": "mmd", "class": "x.MMD"}, "integrator": "rk4", "seed": 1}

    kind = property(lambda self: self._kind)
    replicas = property(lambda self: self._shape[0])
    size = property(lambda self: self._shape[1])
    dim = property(lambda self: self._shape[2])
    steps = property(lambda self: self._steps)
    times = property(lambda self: self._times)
    positions = property(lambda self: self._positions)
    weights = property(lambda self: self._weights)
    means = property(lambda self: self._means)
    covs = property(lambda self: self._covs)
    observables = property(lambda self: self._observables)
    status = property(lambda self: None)
    parameters = property(lambda self: self._parameters)

    def __len__(self):
        return len(self._times)


def spiral_particles(frames=60, R=2, N=400, d=2, seed=0):
    """Particles contracting on a spiral towards the origin (a recognisable picture)."""
    rng = np.random.default_rng(seed)
    x0 = rng.normal(size=(R, N, d)) * 2.0
    t = np.linspace(0.0, 3.0, frames)
    out = np.empty((frames, R, N, d))
    for k, tk in enumerate(t):
        c, s = math.cos(tk), math.sin(tk)
        y = x0.copy()
        y[..., 0], y[..., 1 % d] = c * x0[..., 0] - s * x0[..., 1 % d], s * x0[..., 0] + c * x0[..., 1 % d]
        out[k] = y * math.exp(-0.6 * tk) + 1.0
    energy = np.exp(-1.2 * t)[:, None] * np.arange(1, R + 1)[None]
    w2 = np.exp(-0.6 * t)[:, None] * np.ones(R)[None]
    mean_obs = out.mean(axis=2)  # (frames, R, d): not scalar
    return t, out, {"energy": energy, "w2": w2, "mean": mean_obs}


def gaussian_run(frames=40, R=3, d=2):
    t = np.linspace(0.0, 2.0, frames)
    mean = np.zeros((frames, R, d))
    cov = np.zeros((frames, R, d, d))
    for k, tk in enumerate(t):
        for r in range(R):
            mean[k, r, 0] = 2.0 * math.exp(-tk) + r
            diag = np.array([4.0 * math.exp(-tk) + 0.3] + [1.0 + 0.5 * tk] * (d - 1))
            rot = np.eye(d)
            if d > 1:
                mean[k, r, 1] = math.sin(tk)
                c, s = math.cos(0.5 * tk), math.sin(0.5 * tk)
                rot[:2, :2] = [[c, -s], [s, c]]
            cov[k, r] = rot @ np.diag(diag) @ rot.T
    bures = np.exp(-t)[:, None] * np.ones(R)[None]
    return t, mean, cov, {"bures": bures, "energy": -bures}


def assert_image(path, magic=PNG_MAGIC):
    data = Path(path).read_bytes()
    assert data[: len(magic)] == magic
    img = mpimg.imread(path)
    rgb = img[..., :3].reshape(-1, 3)
    # A real picture has many colours and visible contrast; a failed draw is one flat colour.
    assert rgb.std() > 0.02
    assert len(np.unique((rgb * 255).round(), axis=0)) > 20


def scatter_collections(fig):
    return [c for ax in fig.axes for c in ax.collections if isinstance(c, PathCollection)]


# ------------------------------------------------------------------------------------------------
# overview


def test_plot_run_particles_2d_reads_few_frames_and_subsamples(tmp_path):
    t, pos, obs = spiral_particles(frames=300, N=3000)
    traj = ArrayTrajectory("particles", t, positions=pos, observables=obs)
    out = tmp_path / "run.png"
    fig = plot.plot_run(traj, out, max_particles=500)
    assert isinstance(fig, Figure)
    assert_image(out)
    # ≤ ~50 frames for lines plus the snapshots (which are among them), never the whole dataset.
    assert len(set(traj.positions.reads)) <= 51
    assert len(traj.positions.reads) == len(set(traj.positions.reads))
    scatters = scatter_collections(fig)
    assert len(scatters) == 3  # initial, middle, final
    assert all(len(c.get_offsets()) == 500 for c in scatters)
    # The final snapshot sits where the data is: same points, subsampled.
    final = [c for c in scatters if c.get_gid() == f"snapshot_{len(t) - 1}"][0]
    chosen = np.asarray(final.get_offsets())
    rows = {tuple(np.round(p, 9)) for p in pos[-1, 0]}
    assert all(tuple(np.round(p, 9)) in rows for p in chosen)
    title = fig._suptitle.get_text()
    assert "mmd" in title and "rk4" in title
    # energy and w2 panels (positive → log scale); the non-scalar "mean" is not shown
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "energy" in labels and "w2" in labels and "mean" not in labels
    assert all(ax.get_yscale() == "log" for ax in fig.axes if ax.get_ylabel() in ("energy", "w2"))


def test_subsample_is_deterministic_and_respects_max_particles():
    t, pos, _ = spiral_particles(frames=5, N=1000)
    traj = ArrayTrajectory("particles", t, positions=pos)
    a = plot.plot_run(traj, max_particles=123, frames=[0, -1])
    b = plot.plot_run(traj, max_particles=123, frames=[0, -1])
    oa, ob = (np.concatenate([c.get_offsets() for c in scatter_collections(f)]) for f in (a, b))
    assert len(oa) == 2 * 123
    np.testing.assert_array_equal(oa, ob)
    # fewer particles than the cap: all drawn
    small = plot.plot_run(traj, max_particles=5000, frames=1)
    assert [len(c.get_offsets()) for c in scatter_collections(small)] == [1000]


def test_plot_run_particles_3d_and_1d(tmp_path):
    t, pos, obs = spiral_particles(frames=20, N=300, d=3)
    fig = plot.plot_run(ArrayTrajectory("particles", t, positions=pos, observables=obs))
    main = fig.axes[0]
    assert main.get_xlabel() == "x₁" and main.get_ylabel() == "x₂"
    assert "d = 3" in main.get_title()

    t1, pos1, _ = spiral_particles(frames=30, N=500, d=1)
    fig = plot.plot_run(ArrayTrajectory("particles", t1, positions=pos1, observables={}), tmp_path / "b.png")
    assert_image(tmp_path / "b.png")
    assert fig.axes[0].get_xlabel() == "t"


def test_plot_run_weighted_particles_scale_markers():
    t, pos, _ = spiral_particles(frames=3, R=1, N=50)
    w = np.linspace(1.0, 3.0, 50)[None]
    w /= w.sum()
    fig = plot.plot_run(ArrayTrajectory("particles", t, positions=pos, weights=w), frames=1)
    sizes = scatter_collections(fig)[0].get_sizes()
    assert sizes.max() / sizes.min() == pytest.approx(3.0)


def test_plot_run_gaussians(tmp_path):
    t, mean, cov, obs = gaussian_run(frames=400, d=3)
    traj = ArrayTrajectory("gaussians", t, mean=mean, cov=cov, observables=obs)
    fig = plot.plot_run(traj, tmp_path / "g.png")
    assert_image(tmp_path / "g.png")
    ells = [c for c in fig.axes[0].collections if c.get_gid() == "covariance_ellipses"]
    assert len(ells) == 1 and 2 <= len(ells[0].get_segments()) <= plot.ELLIPSE_FRAMES
    eig_ax = [ax for ax in fig.axes if ax.get_ylabel() == "eigenvalues of Σ"][0]
    assert len(eig_ax.get_lines()) == 3 and eig_ax.get_yscale() == "log"
    # energy is negative: linear axis; bures positive: log axis
    scale = {ax.get_ylabel(): ax.get_yscale() for ax in fig.axes}
    assert scale["energy"] == "linear" and scale["bures"] == "log"

    fig = plot.plot_run(traj, replica="all")
    ells = [c for c in fig.axes[0].collections if c.get_gid() == "covariance_ellipses"]
    assert len(ells) == 3

    t1, m1, c1, _ = gaussian_run(frames=10, R=1, d=1)
    plot.plot_run(ArrayTrajectory("gaussians", t1, mean=m1, cov=c1), tmp_path / "g1.png")
    assert_image(tmp_path / "g1.png")


def write_run(writer, t, pos, energy=None):
    """Write frames ``pos`` (F, R, N, d) at times ``t`` (and an "energy" observable) through ``writer``."""
    names = ["energy"] if energy is not None else []
    writer.open(RunInfo(kind="particles", replicas=pos.shape[1], size=pos.shape[2], dim=pos.shape[3],
                        parameters={"field": {"name": "mmd"}, "integrator": "rk4"}, observable_names=names))
    for k, tk in enumerate(t):
        writer.write_frame(k, tk, measureflow.Particles(torch.as_tensor(pos[k])))
        if energy is not None:
            writer.write_observables(k, tk, {"energy": torch.as_tensor(energy[k])})
    writer.close()
    return writer


def test_inputs_trajectories_and_paths(tmp_path, monkeypatch):
    t, pos, obs = spiral_particles(frames=10, N=100)

    # a path goes through measureflow.open, and the file is closed before returning
    path = tmp_path / "run.h5"
    write_run(H5MDWriter(path), t, pos, obs["energy"])
    closed = []
    real_close = TrajectoryFile.close
    monkeypatch.setattr(TrajectoryFile, "close", lambda self: closed.append(self.path) or real_close(self))
    for given in (str(path), path):
        fig = plot.plot_run(given)
        assert closed[-1] == path and len(scatter_collections(fig)) == 3
        assert [ax.get_ylabel() for ax in fig.axes][1:] == ["energy"]
    # an open file, and the in-memory writer of the same frames, draw the same snapshots
    memory = write_run(MemoryWriter(), t, pos, obs["energy"])
    with measureflow.open(path) as traj:
        from_file = [c.get_offsets() for c in scatter_collections(plot.plot_run(traj))]
    from_memory = [c.get_offsets() for c in scatter_collections(plot.plot_run(memory))]
    for a, b in zip(from_file, from_memory, strict=True):
        np.testing.assert_array_equal(a, b)

    # a trajectory class of one's own: its 4-D positions indexed (frame, replica) directly
    mine = ArrayTrajectory("particles", t, positions=pos, parameters={})
    (snap,) = scatter_collections(plot.plot_run(mine, replica=1, frames=1))
    np.testing.assert_array_equal(snap.get_offsets(), pos[-1, 1])

    # a bare state, as a one-frame Snapshot (with a result's observables over the run)
    series = Series("energy", np.arange(3), np.array([0.0, 0.5, 1.0]), np.array([[3.0], [2.0], [1.0]]))
    state = measureflow.Particles(torch.randn(1, 50, 2))
    fig = plot.plot_run(Snapshot(state, time=1.0, observables={"energy": series}))
    (snap,) = scatter_collections(fig)
    assert snap.get_label() == "t = 1" and len(snap.get_offsets()) == 50
    assert [ax.get_ylabel() for ax in fig.axes][1:] == ["energy"]
    state = measureflow.Particles(torch.randn(1, 300, 2))
    assert [len(c.get_offsets()) for c in scatter_collections(plot.plot_run(Snapshot(state), max_particles=100))] == [100]
    g = measureflow.Gaussians(torch.zeros(2), torch.eye(2))
    assert len(_ellipse_vertices(plot.plot_run(Snapshot(g)))) == 1

    # anything else is refused with what to pass instead
    for other in (state, g, types.SimpleNamespace(state=state, observables={}), pos):
        with pytest.raises(TypeError, match=r"measureflow\.io\.Trajectory.*Snapshot\(state\)"):
            plot.plot_run(other)
    with pytest.raises(TypeError, match="cannot plot a Particles"):
        plot.plot_observables(state)
    with pytest.raises(TypeError, match="cannot plot a Gaussians"):
        plot.animate(g, tmp_path / "g.gif")


# ------------------------------------------------------------------------------------------------
# ellipses


def _ellipse_vertices(fig):
    coll = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "covariance_ellipses"]
    return [np.asarray(s) for s in coll[0].get_segments()]


def test_ellipse_semi_axes_match_covariance():
    # Σ = diag(4, 1) at 1σ: semi-axes √4 = 2 along x and √1 = 1 along y, centred on the mean.
    fig = plot.plot_covariance_ellipses(np.array([1.0, -2.0]), np.diag([4.0, 1.0]), n_std=1.0)
    (v,) = _ellipse_vertices(fig)
    r = v - np.array([1.0, -2.0])
    dist = np.hypot(r[:, 0], r[:, 1])
    # Vertices are exact points of the ellipse; θ = 0, π/2 are on the 129-point grid, so the extremes are hit.
    assert dist.max() == pytest.approx(2.0, abs=1e-12)
    assert dist.min() == pytest.approx(1.0, abs=1e-12)
    assert np.abs(r[:, 0]).max() == pytest.approx(2.0, abs=1e-12)
    assert np.abs(r[:, 1]).max() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(v[0], v[-1])  # closed curve


def test_ellipses_are_level_sets_for_a_batch_of_rotated_covariances():
    rng = np.random.default_rng(3)
    T, d = 5, 4
    a = rng.normal(size=(T, d, d))
    cov = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(d)
    mean = rng.normal(size=(T, d))
    fig = plot.plot_covariance_ellipses(torch.as_tensor(mean), torch.as_tensor(cov), n_std=2.0,
                                        times=np.arange(T) * 0.1, dims=(1, 3))
    verts = _ellipse_vertices(fig)
    assert len(verts) == T
    for k, v in enumerate(verts):
        block = cov[k][np.ix_([1, 3], [1, 3])]
        r = v - mean[k, [1, 3]]
        q = np.einsum("ni,ij,nj->n", r, np.linalg.inv(block), r)
        np.testing.assert_allclose(q, 4.0, rtol=1e-9)  # (x − m)ᵀ Σ⁻¹ (x − m) = k², to round-off
    ax = fig.axes[0]
    assert ax.get_xlabel() == "x₂" and ax.get_ylabel() == "x₄"


def test_ellipses_into_given_axes_and_errors():
    fig = Figure()
    ax = fig.add_subplot()
    assert plot.plot_covariance_ellipses(np.zeros((3, 2)), np.tile(np.eye(2), (3, 1, 1)), ax) is fig
    with pytest.raises(ValueError, match="shape"):
        plot.plot_covariance_ellipses(np.zeros((3, 2)), np.eye(2))
    with pytest.raises(ValueError, match="d ≥ 2"):
        plot.plot_covariance_ellipses(np.zeros((3, 1)), np.ones((3, 1, 1)))
    with pytest.raises(ValueError, match="dims"):
        plot.plot_covariance_ellipses(np.zeros(2), np.eye(2), dims=(0, 0))


# ------------------------------------------------------------------------------------------------
# observables


def test_plot_observables(tmp_path):
    t, pos, obs = spiral_particles(frames=30, R=3, N=20)
    traj = ArrayTrajectory("particles", t, positions=pos, observables=obs)
    fig = plot.plot_observables(traj, ["w2"], tmp_path / "o.png")
    assert_image(tmp_path / "o.png")
    (ax,) = fig.axes
    (line,) = ax.get_lines()
    np.testing.assert_allclose(line.get_ydata(), obs["w2"][:, 0])
    assert ax.get_yscale() == "log"
    assert traj.positions.reads == []  # observables never touch the positions

    fig = plot.plot_observables(traj, replica="all")
    assert {ax.get_ylabel() for ax in fig.axes} == {"energy", "w2"}
    assert all(len(ax.get_lines()) == 3 for ax in fig.axes)
    fig = plot.plot_observables(traj, "mean")  # non-scalar: components of the chosen replica
    assert len(fig.axes[0].get_lines()) == 2

    with pytest.raises(ValueError, match=r"unknown observable.*'nope'.*available: \['energy', 'mean', 'w2'\]"):
        plot.plot_observables(traj, ["w2", "nope"])
    bare = ArrayTrajectory("particles", t, positions=pos)
    with pytest.raises(ValueError, match="no scalar observables"):
        plot.plot_observables(bare)


# ------------------------------------------------------------------------------------------------
# quiver


class Contraction(Field):
    """v(x) = −(x − c) with closure b = −(m − c), A = −I."""

    name = "contraction"

    def __init__(self, centre):
        self.centre = torch.as_tensor(centre, dtype=torch.float64)

    def velocity(self, t, x, state):
        return -(x - self.centre.to(x.dtype))

    def affine(self, t, state):
        R, d = state.mean.shape
        return -(state.mean - self.centre.to(state.mean.dtype)), -torch.eye(d, dtype=state.mean.dtype).expand(R, d, d)


class MeanAttraction(Field):
    """Mean-field: v(x) = m(μ) − x; needs the state, so checks that the state reaches the field."""

    name = "mean-attraction"

    def velocity(self, t, x, state):
        return state.mean()[:, None, :] - x


def test_quiver_draws_the_field_on_a_grid(tmp_path):
    field = Contraction([0.5, -0.5])
    state = measureflow.Particles(torch.randn(2, 800, 2, dtype=torch.float64))
    fig = plot.quiver(field, 0.3, state, bounds=(-2, 2, -1, 1), grid=7, out=tmp_path / "q.png", max_particles=200)
    assert_image(tmp_path / "q.png")
    ax = fig.axes[0]
    arrows = [c for c in ax.collections if type(c).__name__ == "Quiver"][0]
    xy = np.asarray(arrows.XY)
    assert len(xy) == 49 and xy[:, 0].min() == -2 and xy[:, 1].max() == 1
    np.testing.assert_allclose(arrows.U, -(xy[:, 0] - 0.5))
    np.testing.assert_allclose(arrows.V, -(xy[:, 1] + 0.5))
    assert len([c for c in ax.collections if c.get_gid() == "state"][0].get_offsets()) == 200

    # mean-field: the chosen replica's measure is what the field sees
    x = torch.zeros(2, 10, 3, dtype=torch.float64)
    x[1] += torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    fig = plot.quiver(MeanAttraction(), 0.0, measureflow.Particles(x + 0.1 * torch.randn_like(x)), replica=1,
                      bounds=(-1, 1, -1, 1), grid=3)
    arrows = [c for c in fig.axes[0].collections if type(c).__name__ == "Quiver"][0]
    m = (x[1] + 0).mean(0).numpy()
    np.testing.assert_allclose(arrows.U, m[0] - np.asarray(arrows.XY)[:, 0], atol=0.1)  # 0.1·noise of 10 points

    # Gaussian state: the affine closure is drawn
    g = measureflow.Gaussians(torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    fig = plot.quiver(field, 0.0, g, grid=5)
    arrows = [c for c in fig.axes[0].collections if type(c).__name__ == "Quiver"][0]
    np.testing.assert_allclose(arrows.U, -(np.asarray(arrows.XY)[:, 0] - 0.5))
    # d = 1: a curve, not arrows
    fig = plot.quiver(Contraction([0.0]), 0.0, measureflow.Particles(torch.randn(1, 50, 1, dtype=torch.float64)))
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("v(")]
    np.testing.assert_allclose(line.get_ydata(), -line.get_xdata())


def test_quiver_errors():
    with pytest.raises(ValueError, match="grid"):
        plot.quiver(Contraction([0.0, 0.0]), 0.0, None, grid=1)
    with pytest.raises(ValueError, match="bounds"):
        plot.quiver(Contraction([0.0, 0.0]), 0.0, None, bounds=(1, 0, 0, 1))
    with pytest.raises(ValueError, match="replica 5"):
        plot.quiver(Contraction([0.0, 0.0]), 0.0, measureflow.Particles(torch.zeros(1, 3, 2)), replica=5)
    with pytest.raises(TypeError, match="Particles or Gaussians"):
        plot.quiver(Contraction([0.0, 0.0]), 0.0, np.zeros((3, 2)))


# ------------------------------------------------------------------------------------------------
# animations


def _gif_frames(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.n_frames


def test_animate_particles_and_gaussians(tmp_path):
    t, pos, _ = spiral_particles(frames=40, N=600)
    traj = ArrayTrajectory("particles", t, positions=pos)
    out = tmp_path / "p.gif"
    fig = plot.animate(traj, out, max_particles=100, max_frames=6, fps=5)
    assert out.read_bytes()[:4] == b"GIF8"
    assert _gif_frames(out) == 6
    assert len(set(traj.positions.reads)) == 6
    dots = [c for c in scatter_collections(fig) if c.get_gid() == "particles"][0]
    assert len(dots.get_offsets()) == 100
    np.testing.assert_allclose(dots.get_offsets(), pos[-1, 0][particle_subset(600, 100)][:, :2])

    tg, mean, cov, _ = gaussian_run(frames=30)
    out = tmp_path / "g.gif"
    plot.animate(ArrayTrajectory("gaussians", tg, mean=mean, cov=cov), out, replica="all", max_frames=4)
    assert _gif_frames(out) == 4

    t1, pos1, _ = spiral_particles(frames=10, N=200, d=1)
    plot.animate(ArrayTrajectory("particles", t1, positions=pos1), tmp_path / "h.gif", max_frames=3)
    assert _gif_frames(tmp_path / "h.gif") == 3


def test_animate_errors(tmp_path):
    t, pos, _ = spiral_particles(frames=4, N=10)
    traj = ArrayTrajectory("particles", t, positions=pos)
    with pytest.raises(ValueError, match=r"\.gif"):
        plot.animate(traj, tmp_path / "x.png")
    with pytest.raises(ValueError, match="replica='all'"):
        plot.animate(traj, tmp_path / "x.gif", replica="all")


# ------------------------------------------------------------------------------------------------
# errors shared by the trajectory pictures


def test_clear_errors():
    t, pos, obs = spiral_particles(frames=4, N=10)
    empty = ArrayTrajectory("particles", [], positions=pos[:0], observables={})
    with pytest.raises(ValueError, match="no frames"):
        plot.plot_run(empty)
    traj = ArrayTrajectory("particles", t, positions=pos, observables=obs)
    with pytest.raises(ValueError, match=r"replica 7 does not exist.*2 replica"):
        plot.plot_run(traj, replica=7)
    with pytest.raises(ValueError, match="max_particles"):
        plot.plot_run(traj, max_particles=0)
    with pytest.raises(ValueError, match="frame 9 does not exist"):
        plot.plot_run(traj, frames=[0, 9])
    with pytest.raises(ValueError, match="replica='all'"):
        plot.plot_run(traj, replica="all")
    with pytest.raises(TypeError, match="cannot plot a int"):
        plot.plot_run(3)


# ------------------------------------------------------------------------------------------------
# a real run: Simulation → H5MD file → reader → pictures


def spread(state, **_):
    """Trace of the covariance per replica, a positive observable."""
    return state.covariance().diagonal(dim1=-2, dim2=-1).sum(-1)


@pytest.mark.parametrize("kind", ["particles", "gaussians"])
def test_real_trajectory_file(tmp_path, kind):
    path = tmp_path / "run.h5"
    writer = measureflow.get_registry().writer("h5md", path, every=1)
    memory = MemoryWriter()
    A = torch.tensor([[-0.5, -2.0], [1.0, -0.5]], dtype=torch.float64)
    field = measureflow.field("linear", A=A, b=torch.zeros(2, dtype=torch.float64))
    start = measureflow.Gaussians(torch.tensor([2.0, -1.0], dtype=torch.float64).expand(2, -1),
                                  torch.tensor([[1.5, 0.6], [0.6, 0.8]], dtype=torch.float64).expand(2, -1, -1))
    if kind == "particles":
        start = start.sample(300, torch.Generator().manual_seed(0))
    result = measureflow.Simulation(start, field, "rk4", 0.0, 2.0, steps=40, writers=[writer, memory],
                                    observers=[spread], observe_every=1, progress=False).run()
    assert result.ok
    fig = plot.plot_run(path, tmp_path / "run.png", max_particles=100)
    assert_image(tmp_path / "run.png")
    assert "linear" in fig._suptitle.get_text() and "rk4" in fig._suptitle.get_text()
    assert "spread" in [ax.get_ylabel() for ax in fig.axes]
    plot.animate(path, tmp_path / "run.gif", max_frames=3, max_particles=50)
    assert _gif_frames(tmp_path / "run.gif") == 3
    # The run's file, its in-memory writer and the Result itself draw the same curves.
    curves = [plot.plot_observables(traj, ["spread"], replica="all").axes[0].get_lines()
              for traj in (path, memory, result)]
    assert len(curves[0]) == 2
    for a, b, c in zip(*curves, strict=True):
        np.testing.assert_array_equal(a.get_xydata(), b.get_xydata())
        np.testing.assert_array_equal(a.get_xydata(), c.get_xydata())
    assert isinstance(result, Trajectory) and len(result) == len(memory) == 41
