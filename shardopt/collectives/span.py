"""``Span``: a half-open range of element offsets, the unit every flat-buffer computation speaks in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """The half-open range ``[start, end)`` of element offsets."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"invalid span [{self.start}, {self.end})")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def slice(self) -> slice:
        return slice(self.start, self.end)

    def intersect(self, other: Span) -> Span | None:
        """The overlap of two spans, or None where they share no element."""
        start, end = max(self.start, other.start), min(self.end, other.end)
        return Span(start, end) if start < end else None

    def shift(self, offset: int) -> Span:
        return Span(self.start + offset, self.end + offset)
