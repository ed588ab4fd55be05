"""What ``nio_fast.initialize`` returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional


@dataclass
class InitReport:
    """The outcome of one ``initialize`` call.

    ``history`` has one dict per iteration that ran. NIO: ``gradcosine``, ``gnorm``,
    ``constraint`` (a constraint step, gnorm > gamma), ``objective`` (the J that was
    minimised). GradInit: ``loss`` (of the first batch, S1) instead of ``gradcosine``, and
    ``gnorm`` is the L1 (adam) or L2 (sgd) norm of its gradient.
    """

    method: str
    scales: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    gamma: Optional[float] = None
    iterations: int = 0
    stopped_early: bool = False
    stop_reason: Optional[str] = None
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    distributed: Optional[dict[str, Any]] = None
    """A distributed run's communication: world_size, backend, bytes_sent (by each rank, to
    collectives), bytes_per_iteration, collective_calls, gradient_numel (m). None otherwise."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)

    @property
    def gradcosine_first(self) -> Optional[float]:
        """GradCosine at the starting point (NIO only), measured on the first batch."""
        return self.history[0].get("gradcosine") if self.history else None
