import pytest

from train.config import OptimConfig
from train.schedule import lr_factor


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, 100, cfg) == pytest.approx(0.55)  # half way down: (1 + 0.1) / 2


def test_constant():
    cfg = OptimConfig(warmup_steps=4, schedule="constant")
    assert [lr_factor(s, 50, cfg) for s in (0, 3, 4, 49)] == [0.25, 1.0, 1.0, 1.0]


def test_wsd_holds_then_decays_linearly():
    cfg = OptimConfig(warmup_steps=5, schedule="wsd", decay_ratio=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, 100, cfg) == 1.0 and lr_factor(79, 100, cfg) == 1.0
    assert lr_factor(80, 100, cfg) == pytest.approx(1 - 1 / 20)
    assert lr_factor(99, 100, cfg) == pytest.approx(0.0)
