"""Progress output fit for a terminal and for a log: one updating line, or plain lines.

On a terminal :class:`ProgressLine` keeps one line and rewrites it in place
(carriage return, the text, erase to the end of the line), at most
``refresh_s`` apart. Anywhere else (a pipe, a file, a CI log) it prints a
plain line at every tenth of the run and at the end: no carriage returns, no
escape codes, so ``make demo > demo.log`` reads as text.

>>> import io
>>> out = io.StringIO()
>>> line = ProgressLine(100, stream=out, label="training")
>>> for step in range(1, 101):
...     line.update(step, f"loss {1 / step:.2f}")
>>> line.close()
>>> print(out.getvalue().splitlines()[0])
training: step 10/100 (10%)  loss 0.10
>>> len(out.getvalue().splitlines())
10
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import TextIO

ERASE_TO_END = "\x1b[K"


class ProgressLine:
    """Shows ``label: step N/TOTAL (P%)  detail`` as a run goes.

    Args:
        total: the number of steps.
        stream: where to write (default ``sys.stdout``).
        label: what is progressing.
        lines: how many plain lines a whole run prints when not on a terminal.
        tty: force terminal (True) or plain (False) output; None: ``stream.isatty()``.
        refresh_s: the least time between two redraws on a terminal.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        *,
        label: str = "training",
        lines: int = 10,
        tty: bool | None = None,
        refresh_s: float = 0.1,
    ) -> None:
        self.total = max(1, total)
        self.stream = sys.stdout if stream is None else stream
        self.label = label
        self.tty = _isatty(self.stream) if tty is None else tty
        self._every = max(1, math.ceil(self.total / max(1, lines)))
        self._refresh_s = refresh_s
        self._step = 0
        self._detail = ""
        self._printed_step = 0
        self._drawn_at = -math.inf
        self._start = time.monotonic()
        self._closed = False

    def update(self, step: int, detail: str | None = None) -> None:
        """Record progress to ``step`` (and a new ``detail`` text, if given)."""
        if self._closed:
            return
        self._step = step
        if detail is not None:
            self._detail = detail
        if self.tty:
            now = time.monotonic()
            if now - self._drawn_at >= self._refresh_s or step >= self.total:
                self._drawn_at = now
                self._draw()
        elif step // self._every > self._printed_step // self._every or (
            step >= self.total > self._printed_step
        ):
            self._print()

    def message(self, text: str) -> None:
        """Print ``text`` on a line of its own (above the updating line on a terminal).

        >>> import io
        >>> out = io.StringIO()
        >>> line = ProgressLine(10, stream=out, tty=False)
        >>> line.message("ALERT")
        >>> out.getvalue()
        'ALERT\\n'
        """
        if self.tty and not self._closed:
            self.stream.write("\r" + ERASE_TO_END + text + "\n")
            self._draw()
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the display: a final redraw and newline on a terminal, a last plain line."""
        if self._closed:
            return
        self._closed = True
        if self.tty:
            self._draw()
            self.stream.write("\n")
        elif self._step != self._printed_step:
            self._print()
        self.stream.flush()

    def text(self) -> str:
        """The current line, without any control characters."""
        percent = 100.0 * min(self._step, self.total) / self.total
        text = f"{self.label}: step {self._step}/{self.total} ({percent:.0f}%)"
        if self.tty:
            elapsed = time.monotonic() - self._start
            if self._step > 0 and elapsed > 0:
                text += f"  {self._step / elapsed:.1f} step/s"
        return f"{text}  {self._detail}" if self._detail else text

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        self.stream.write("\r" + self.text()[: max(10, width - 1)] + ERASE_TO_END)
        self.stream.flush()

    def _print(self) -> None:
        self._printed_step = self._step
        self.stream.write(self.text() + "\n")
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
