"""`LogBudget`: a flood of refusals (bad handshakes, refused opens) is counted, not all logged."""

from __future__ import annotations

import trio
import trio.testing

from kins_tunnel.logs import LogBudget


async def test_at_most_rate_lines_a_second_and_the_rest_reported_with_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = LogBudget(20)
    allowed = [budget.allow() for _ in range(25)]
    assert allowed == [True] * 20 + [False] * 5
    await trio.sleep(1.0)
    assert budget.allow()
    assert budget.take_suppressed() == 5
    assert budget.take_suppressed() == 0
