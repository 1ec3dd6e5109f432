"""One progress-bar helper so library code reports progress the same way everywhere."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``; shows a bar on a terminal and stays quiet otherwise."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not sys.stderr.isatty(), transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: float) -> None:
            info = " ".join(f"{k} {v:.3f}" for k, v in fields.items())
            progress.update(task, advance=1, info=info)

        yield advance
