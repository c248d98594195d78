"""How long-running library code reports progress without printing: the CLI passes a rich-backed one."""

from __future__ import annotations

from typing import Iterable, Iterator, Protocol, TypeVar

T = TypeVar("T")


class Progress(Protocol):
    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]: ...

    def phase(self, description: str) -> None: ...


class Silent:
    """Progress that shows nothing: the default for library callers and tests."""

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        return iter(items)

    def phase(self, description: str) -> None:
        return None
