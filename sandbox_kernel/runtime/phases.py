"""Where a start's time goes: named phases on one clock.

Layer: runtime (OS side, no Jupyter packages). One ``Phases`` follows one start:
``Container.create`` and ``Container.start`` mark their own steps on it, the provisioner
marks its steps around them on the same object, and whoever owns it logs ``text()`` at
debug level (``sandbox-kernel --debug run``, the server's ``--debug``). The benchmarks read
``ms`` to print where the time of a cold start went, phase by phase.
"""

from __future__ import annotations

import time


class Phases:
    """Milliseconds per named phase, in the order first marked. A phase is the time since
    the previous mark (or since creation): mark each step right after it ends."""

    def __init__(self) -> None:
        self._origin = self._last = time.perf_counter()
        #: phase name -> milliseconds (a name marked twice adds up)
        self.ms: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """End the phase ``name`` now."""
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._last) * 1000
        self._last = now

    def note(self, name: str, ms: float) -> None:
        """Record a figure measured elsewhere (the executor's own setup time, which is part
        of a phase marked here): shown, not added to the total."""
        self.ms[f"({name})"] = ms

    @property
    def total_ms(self) -> float:
        """Milliseconds from creation to the last mark."""
        return (self._last - self._origin) * 1000

    def text(self) -> str:
        """One line: ``name 1.2 ms, ... (total 290.0 ms)``."""
        parts = [f"{name} {ms:.1f} ms" for name, ms in self.ms.items()]
        return ", ".join(parts) + f" (total {self.total_ms:.1f} ms)"
