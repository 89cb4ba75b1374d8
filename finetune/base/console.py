"""The terminal: one console for results (stdout) and one for warnings and errors (stderr).

Plain lines go through print_lines, so a path or a user's text is never read as rich markup.
"""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# soft_wrap: never break a message or a path across lines, whatever the terminal width.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")


def print_lines(*lines: str) -> int:
    """Plain lines (no markup in them): warnings to stderr, everything else to stdout, a run's
    "Done:" in bold green. Returns 0, the exit code of a verb that only prints."""
    for line in lines:
        if line.startswith("warning: "):
            print_warnings([line.removeprefix("warning: ")])
        elif line.startswith("Done: "):  # a run's summary line
            console.print(Text.assemble(("Done:", "bold green"), line.removeprefix("Done:")))
        else:
            console.print(line, markup=False)
    return 0


def print_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = Table(*columns, show_edge=False, box=None, pad_edge=False)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@contextlib.contextmanager
def progress_bar(description: str):
    """A bar on stderr for a long loop whose size is known later: yields ``start(total)``, which
    shows the bar and returns its ``advance(n)``; the bar is closed however the block ends."""
    bar = Progress(
        TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err_console
    )

    def start(total: int):
        task = bar.add_task(description, total=total)
        bar.start()
        return lambda n: bar.advance(task, n)

    try:
        yield start
    finally:
        if bar.live.is_started:  # stopping a bar never shown would print an empty line
            bar.stop()
