"""Circuit breaking and retry backoff: pure, clock passed in, so the policy is unit-testable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive failures (or one fatal failure: refused
    connection, timeout), open -> half-open after ``cooldown`` seconds (one trial request is let
    through), half-open -> closed on success or back to open on failure."""

    threshold: int = 3
    cooldown: float = 5.0
    state: BreakerState = "closed"
    failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False

    def allows(self, now: float) -> bool:
        """Whether routing may send this instance a request now (moves open -> half-open when due)."""
        if self.state == "open" and now - self.opened_at >= self.cooldown:
            self.state, self.trial_in_flight = "half_open", False
        if self.state == "half_open":
            return not self.trial_in_flight
        return self.state == "closed"

    def on_dispatch(self) -> None:
        if self.state == "half_open":
            self.trial_in_flight = True

    def on_success(self) -> None:
        self.state, self.failures, self.trial_in_flight = "closed", 0, False

    def on_failure(self, now: float, fatal: bool = False) -> None:
        self.failures += 1
        if fatal or self.failures >= self.threshold or self.state == "half_open":
            self.state, self.opened_at, self.trial_in_flight = "open", now, False


def backoff_delay(base: float, attempt: int, cap: float = 2.0) -> float:
    """Exponential backoff before retry number ``attempt`` (1-based)."""
    return min(cap, base * (2 ** (attempt - 1)))
