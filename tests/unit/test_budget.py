"""The request deadline on a clock the test owns."""

from __future__ import annotations

import pytest

from proxy.budget import BadTimeoutHeader, Budget
from proxy.config import BudgetSettings
from proxy.headers import serialize_fields


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_deadline_is_the_budget_minus_the_margin() -> None:
    clock = FakeClock()
    budget = Budget.start(BudgetSettings(seconds=40, margin=1), clock=clock)
    assert budget.remaining() == 39
    clock.now += 38.5
    assert budget.remaining() == pytest.approx(0.5)
    assert budget.remaining_ms_header() == "500"
    clock.now += 1
    assert budget.expired()
    assert budget.remaining() == 0


def test_the_remaining_budget_line_is_the_field_serialized() -> None:
    clock = FakeClock()
    budget = Budget.start(BudgetSettings(seconds=40, margin=1), clock=clock)
    for elapsed in (0.0, 12.3456, 38.9999, 45.0):
        clock.now = 100.0 + elapsed
        assert budget.remaining_line() == serialize_fields((budget.remaining_field(),))
    assert budget.remaining_line() == b"X-Servegate-Remaining-Ms: 0\r\n"


def test_a_client_may_ask_for_less_never_for_more() -> None:
    settings = BudgetSettings(seconds=40, margin=1)
    assert Budget.start(settings, "1000", clock=FakeClock()).total == 1.0
    assert Budget.start(settings, "90000", clock=FakeClock()).total == 39.0
    # Any number larger than the budget is the budget, however many digits it has.
    assert Budget.start(settings, "1" + "0" * 12, clock=FakeClock()).total == 39.0
    assert Budget.start(settings, "9" * 5000, clock=FakeClock()).total == 39.0
    assert Budget.start(settings, "000500", clock=FakeClock()).total == 0.5


@pytest.mark.parametrize(
    "raw", ["", "soon", "-5", "0", "000", "1.5", "1e3", "٣", "99999, 500", "500,500"]
)
def test_malformed_client_budgets_are_refused(raw: str) -> None:
    with pytest.raises(BadTimeoutHeader):
        Budget.start(BudgetSettings(), raw, clock=FakeClock())
