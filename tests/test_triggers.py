import pickle

import pytest

from measureflow import On, Periodic
from measureflow.triggers import as_trigger


def test_periodic_on_and_int():
    assert [s for s in range(10) if Periodic(3)(s)] == [0, 3, 6, 9]
    assert [s for s in range(10) if Periodic(4, phase=1)(s)] == [1, 5, 9]
    assert [s for s in range(10) if On([2, 7])(s)] == [2, 7]
    assert as_trigger(5) == Periodic(5)
    assert not any(as_trigger(None)(s) for s in range(5))
    assert pickle.loads(pickle.dumps(Periodic(2))) == Periodic(2)


def test_bad_triggers():
    with pytest.raises(ValueError):
        Periodic(0)
    with pytest.raises(TypeError):
        as_trigger(True)
