"""measureflow.cache.DeviceCache: one build per (device, dtype), the same object afterwards."""

import pickle

import pytest
import torch

from measureflow.cache import DeviceCache

F64 = torch.float64


class Precision:
    """A field-like owner: a fixed float64 matrix, converted on demand (a bound method pickles)."""

    def __init__(self):
        self.matrix = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
        self.builds = []
        self.cache = DeviceCache(self._build)

    def _build(self, like):
        self.builds.append((like.device, like.dtype))
        return self.matrix.to(like)


def test_builds_once_per_dtype_and_returns_the_same_object():
    owner = Precision()
    x32 = torch.zeros(3, 2, dtype=torch.float32)
    first = owner.cache(x32)
    assert first.dtype == torch.float32 and torch.equal(first, owner.matrix.float())
    # other values and shapes, same device and dtype: the very same object, no second build
    assert owner.cache(torch.ones(7, 5, 2, dtype=torch.float32)) is first
    half = owner.cache(torch.zeros(1, 2, dtype=torch.float16))
    assert half.dtype == torch.float16 and half is not first
    assert owner.cache(torch.zeros(2, dtype=F64)) is owner.matrix  # .to of the same place returns itself
    assert owner.builds == [(x32.device, torch.float32), (x32.device, torch.float16), (x32.device, F64)]
    assert len(owner.cache) == 3


def test_devices_are_told_apart(devices):
    owner = Precision()
    for device in devices:
        got = owner.cache(torch.zeros(1, 2, dtype=F64, device=device))
        assert got.device.type == device.type
        assert owner.cache(torch.zeros(4, 2, dtype=F64, device=device)) is got
    assert len(owner.builds) == len(devices)


def test_clear_rebuilds_and_none_is_a_value():
    calls = []
    cache = DeviceCache(lambda like: calls.append(like.dtype))  # builds None
    x = torch.zeros(2)
    assert cache(x) is None and cache(x) is None
    assert calls == [torch.float32]  # None was kept, not mistaken for "not built"
    cache.clear()
    assert len(cache) == 0
    cache(x)
    assert calls == [torch.float32, torch.float32]


def test_pickling_keeps_the_build_and_drops_the_copies():
    owner = Precision()
    owner.cache(torch.zeros(2, dtype=torch.float32))
    copy = pickle.loads(pickle.dumps(owner))
    assert len(copy.cache) == 0 and len(owner.cache) == 1
    again = copy.cache(torch.zeros(2, dtype=torch.float32))
    assert torch.equal(again, owner.matrix.float())
    assert copy.builds == [(torch.device("cpu"), torch.float32)] * 2  # the original's record, then the rebuild


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="build must be a callable"):
        DeviceCache(3)
    with pytest.raises(TypeError, match="pass a tensor .* received float"):
        DeviceCache(lambda like: like)(1.0)


def test_owners_of_equal_caches_stay_the_same_value_for_packing():
    """Packing compares fields value by value (measureflow.packing.same_value); a cache's build is a bound
    method, so two fields built alike must compare equal through it, whether the build is a method of the
    owner or of one of its tensors, and differ when what the build converts differs."""
    import measureflow
    from measureflow.packing import same_value

    a, b, other = Precision(), Precision(), Precision()
    other.matrix = other.matrix * 2
    assert same_value(a, b) and not same_value(a, other)
    ou = [measureflow.field("ornstein_uhlenbeck", center=c) for c in (1.0, 1.0, 2.0)]  # DeviceCache(center.to)
    assert same_value(ou[0], ou[1]) and not same_value(ou[0], ou[2])
