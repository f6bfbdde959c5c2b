import pytest

from petra.schedule import cosine_envelope, lr_factor


def test_cosine_warmup_and_floor():
    total, warm = 100, 10
    assert lr_factor(0, total, warm, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, total, warm, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, total, warm, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, total, warm, 0.1) == pytest.approx(0.1)
    mid = 10 + (99 - 10) / 2
    assert cosine_envelope(int(mid), total, warm, 0.1) == pytest.approx(0.55, abs=0.02)
    assert all(lr_factor(s, total, warm, 0.1) >= lr_factor(s + 1, total, warm, 0.1) for s in range(10, 99))


def test_jagged_schedule_drops_to_zero_and_rewarms_to_envelope():
    total, warm, restarts, rw = 1000, 100, [250, 500, 750], 50
    for r in restarts:
        assert lr_factor(r, total, warm, 0.1, restarts, rw) == 0.0
        assert lr_factor(r + 25, total, warm, 0.1, restarts, rw) == pytest.approx(
            0.5 * cosine_envelope(r + 25, total, warm, 0.1)
        )
        assert lr_factor(r + 50, total, warm, 0.1, restarts, rw) == pytest.approx(
            cosine_envelope(r + 50, total, warm, 0.1)
        )
        # just before the restart the envelope is untouched
        assert lr_factor(r - 1, total, warm, 0.1, restarts, rw) == cosine_envelope(r - 1, total, warm, 0.1)
