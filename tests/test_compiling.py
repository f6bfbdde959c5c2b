"""torch.compile with a fallback: a failing compile warns once and runs eagerly from then on."""

import pytest

from petra.compiling import with_fallback


def test_a_failing_compile_warns_once_and_runs_eagerly_for_good():
    calls = {"compiled": 0, "eager": 0, "undone": 0}

    def compiled(x):
        calls["compiled"] += 1
        raise RuntimeError("inductor: no C++ compiler")

    def eager(x):
        calls["eager"] += 1
        return 2 * x

    f = with_fallback(compiled, eager, "the test function", on_fallback=lambda: calls.__setitem__("undone", 1))
    with pytest.warns(UserWarning, match="torch.compile failed for the test function .RuntimeError: inductor"):
        assert f(3) == 6
    assert f(4) == 8
    assert calls == {"compiled": 1, "eager": 2, "undone": 1}


def test_a_working_compile_is_used_and_its_first_call_timed(recwarn):
    first = []
    f = with_fallback(lambda x: x + 1, lambda x: -1, "f", on_first=first.append)
    assert [f(1), f(2)] == [2, 3]
    assert len(first) == 1 and first[0] >= 0 and not recwarn.list
