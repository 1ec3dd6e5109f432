"""One way for library code to report progress: a bar on a terminal, plain lines when stderr is a file or pipe."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield ``advance(**fields)``: one step done, and the fields shown, when given, until the next ones; shows a
    bar on a terminal and stays quiet otherwise."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not sys.stderr.isatty(), transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(**fields: float) -> None:
            shown = {"info": " ".join(f"{k} {v:.3f}" for k, v in fields.items())} if fields else {}
            progress.update(task, advance=1, **shown)

        yield advance


def plain_line(text: str) -> None:
    """Print ``text`` as one line on stderr, flushed, when stderr is not a terminal (a log file, a pipe); on a
    terminal the progress bars say it already, so nothing is printed."""
    if not sys.stderr.isatty():
        print(text, file=sys.stderr, flush=True)
