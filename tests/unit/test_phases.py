"""The start trace: phases in the order first marked, a name marked twice adds up, a note
is shown but not counted."""

from __future__ import annotations

import re
import time

from sandbox_kernel.runtime.phases import Phases


def test_phases_add_up_in_order() -> None:
    p = Phases()
    time.sleep(0.01)
    p.mark("plan")
    p.mark("spawn")
    time.sleep(0.01)
    p.mark("plan")
    p.note("executor's own setup", 7.25)
    assert list(p.ms) == ["plan", "spawn", "(executor's own setup)"]
    assert p.ms["plan"] >= 20 and p.ms["spawn"] < p.ms["plan"]
    assert abs(p.total_ms - (p.ms["plan"] + p.ms["spawn"])) < 0.01
    assert re.fullmatch(
        r"plan [\d.]+ ms, spawn [\d.]+ ms, \(executor's own setup\) 7\.2 ms "
        r"\(total [\d.]+ ms\)",
        p.text(),
    ), p.text()
