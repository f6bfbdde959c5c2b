import math

import pytest

from petra.health import Health, fmt_ppl, perplexity


def test_perplexity_never_overflows():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0)) and fmt_ppl(2.0) == f"{math.exp(2.0):.2f}"
    for loss in (211.0, 1e6, float("nan"), float("inf")):
        assert perplexity(loss) is None and fmt_ppl(loss).startswith("overflow (loss ")
    assert perplexity(None) is None


def test_health_counts_skips_in_a_row_and_patience():
    logs = []
    h = Health(vocab_size=1000, max_skipped=2, patience=3, log=logs.append)
    ln = math.log(1000)
    assert h.check(1, float("nan"), 1.0) is None and h.check(2, 5.0, float("inf")) is None
    assert h.check(3, 5.0, 1.0) is None and h.skipped_in_row == 0 and h.skipped == 2  # a good step resets
    for s in (4, 5):
        assert h.check(s, float("nan"), float("nan")) is None
    assert "3 steps in a row" in h.check(6, float("nan"), float("nan"))
    h = Health(1000, 2, patience=3, log=logs.append)
    assert h.check(1, ln + 2, 1.0) is None and any("worse than a uniform guess" in x for x in logs)
    assert h.check(2, ln + 2, 1.0) is None and h.check(3, ln, 1.0) is None  # back under: the count restarts
    assert h.check(4, ln + 2, 0.0) is None and h.check(5, ln + 2, 0.0) is None
    assert h.check(6, ln + 2, 0.0).startswith("collapsed")
    assert Health(1000, 2, patience=0).check(1, ln + 5, 0.0) is None  # 0 = never stop
