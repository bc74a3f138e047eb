"""One progress bar per preparation stage, or none.

tqdm is only needed when a person watches; library callers and tests pass
progress=False and never import it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from speedec.errors import DataError

T = TypeVar("T")


def stage(
    items: Iterable[T], desc: str, *, enabled: bool, total: int | None = None, unit: str = "it"
) -> Iterator[T]:
    """Iterate over `items`, drawing a tqdm bar named `desc` when enabled."""
    if not enabled:
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise DataError("progress bars need tqdm: pip install tqdm, or pass progress=False") from exc
    yield from tqdm(items, desc=desc, total=total, unit=unit, dynamic_ncols=True)
