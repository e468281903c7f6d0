"""Where things live in a measureflow trajectory file (H5MD 1.1, DESIGN.md "Trajectory files").

The writer and the reader share these names so the layout is stated once::

    /h5md                        +version = [1, 1]
        author                   +name
        creator                  +name = "measureflow", +version
        modules/measureflow      +version = MODULE_VERSION
    /particles/trajectory        (particle runs only)
        box                      +dimension = d, +boundary = ["none"] * d
        position/{step, time, value[frames][R·N][d]}
        <channel>/{step, time, value[frames][R·N]...}   (auxiliary channels: log_density, …)
        weight[R·N]              (fixed in time; when weights move, MATH.md §15.6:
                                  weight/{step, time, value[frames][R·N]})
        replica[R·N]             (fixed in time: which replica each row belongs to)
    /observables/<name>/{step, time, value[frames][R]...}
    /parameters/measureflow      scalar JSON string (scenario parameters, seed, field, integrator, versions)
    /measureflow/gaussians/{mean, cov}/{step, time, value}   (Gaussian runs only)
    /measureflow/mixtures/{weights, mean, cov}/{step, time, value[frames][R][K]...}   (mixture runs only)
    /particles/gaussians         (Gaussian runs only: the H5MD view of the means)
        box                      +dimension = d, +boundary = ["none"] * d
        position -> /measureflow/gaussians/mean   (soft link: value[frames][R][d], a replica's mean
                                                   as a particle's position)
        covariance -> /measureflow/gaussians/cov  (soft link)
    /measureflow/committed[k]    rows known to be on disk for each time-dependent element (+elements)
    /measureflow/status          +status, +step, +time, +message (the run's final status)

Strings that H5MD prescribes are stored as fixed-length strings, as the specification asks.
"""

from __future__ import annotations

import math

import h5py
import numpy as np

#: H5MD specification version the files follow.
H5MD_VERSION = (1, 1)
#: Version of the measureflow module (the layout below /measureflow and /parameters/measureflow).
MODULE_VERSION = (1, 0)

PARTICLES = "particles/trajectory"
POSITION = PARTICLES + "/position"
WEIGHT = PARTICLES + "/weight"
REPLICA = PARTICLES + "/replica"
#: Names a channel cannot take (the fixed members of the particle group).
RESERVED_CHANNELS = ("position", "weight", "replica", "box", "image", "velocity")
BOX = PARTICLES + "/box"
OBSERVABLES = "observables"
PARAMETERS = "parameters/measureflow"
PRIVATE = "measureflow"
MEAN = PRIVATE + "/gaussians/mean"
COV = PRIVATE + "/gaussians/cov"
GAUSSIAN_VIEW = "particles/gaussians"
GAUSSIAN_BOX = GAUSSIAN_VIEW + "/box"
GAUSSIAN_POSITION = GAUSSIAN_VIEW + "/position"
GAUSSIAN_COVARIANCE = GAUSSIAN_VIEW + "/covariance"
MIX_WEIGHTS = PRIVATE + "/mixtures/weights"
MIX_MEAN = PRIVATE + "/mixtures/mean"
MIX_COV = PRIVATE + "/mixtures/cov"
COMMITTED = PRIVATE + "/committed"
STATUS = PRIVATE + "/status"

#: Chunk sizes: frames are large (positions) or tiny (steps, observables); aim each chunk at a
#: size that HDF5 reads and writes efficiently without making a crash lose more than a chunk.
FRAME_CHUNK_BYTES = 1 << 20
SMALL_CHUNK_BYTES = 1 << 14
#: Most frames one chunk may hold: HDF5 allocates whole chunks, so a short run of tiny frames must
#: not reserve a chunk sized for thousands of them.
FRAME_CHUNK_FRAMES = 16
SMALL_CHUNK_FRAMES = 256
#: Per-dataset chunk cache: large enough to keep a partially filled multi-frame chunk in memory.
CHUNK_CACHE_BYTES = 4 << 20


def chunk_shape(
    sample_shape: tuple[int, ...], itemsize: int, target: int, max_frames: int
) -> tuple[int, ...]:
    """Chunk of a dataset shaped [frames, *sample_shape], close to ``target`` bytes.

    Small samples are grouped up to ``max_frames`` frames to a chunk; a sample larger than
    ``target`` is split along its first axis into equal parts (equal, so the last part does not
    waste most of a chunk).
    """
    sample_bytes = itemsize * math.prod(sample_shape)
    if sample_bytes <= target or not sample_shape:
        return (max(1, min(max_frames, target // max(sample_bytes, 1))), *sample_shape)
    parts = math.ceil(sample_bytes / target)
    first = max(1, math.ceil(sample_shape[0] / parts))
    return (1, first, *sample_shape[1:])


def fixed_string(value: str) -> np.ndarray:
    """A scalar fixed-length UTF-8 string (H5MD asks for fixed-length strings in its metadata)."""
    data = value.encode("utf-8")
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(1, len(data))))


def fixed_strings(values) -> np.ndarray:
    data = [v.encode("utf-8") for v in values]
    width = max([1, *(len(d) for d in data)])
    return np.array(data, dtype=h5py.string_dtype("utf-8", width))


def set_text(attrs, name: str, value: str) -> None:
    attrs.create(name, fixed_string(value))


def text(value) -> str | list[str]:
    """Decode an attribute or dataset value that holds text (fixed- or variable-length)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            return text(value[()])
        return [text(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return text(value.item())
    return str(value)


def is_element(obj) -> bool:
    """A time-dependent H5MD element: a group holding ``step`` and ``value`` datasets."""
    return isinstance(obj, h5py.Group) and isinstance(obj.get("step"), h5py.Dataset) and isinstance(
        obj.get("value"), h5py.Dataset
    )
