"""A table redrawn in place on a terminal with plain ANSI codes, and single key presses.

When the output is not a terminal (a pipe, a file, CI), each frame is printed below the last
one, without colours, so scripted runs keep a readable record.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import sys
import termios
import tty
from collections.abc import Iterator
from typing import TextIO

RESET = "\x1b[0m"
_ANSI = re.compile(r"(\x1b\[[0-9;?]*[A-Za-z])")
_HIDE_CURSOR = "\x1b[?25l"
_SHOW_CURSOR = "\x1b[?25h"
_CLEAR_LINE_END = "\x1b[K"
_CLEAR_SCREEN_END = "\x1b[J"


class Screen:
    """Lines said above the table, then the table redrawn in place."""

    def __init__(self, stream: TextIO, *, color: bool) -> None:
        self.stream = stream
        self.live = stream.isatty()
        self.color = self.live and color
        self._drawn = 0
        self.closed = False
        """The output went away (terminal closed, pipe reader gone): nothing more is written."""

    @property
    def width(self) -> int | None:
        """Columns a line may use (None when not a terminal: lines are not cut)."""
        return shutil.get_terminal_size().columns - 1 if self.live else None

    def say(self, text: str = "") -> None:
        self._write(text + "\n")

    def style(self, text: str, code: str) -> str:
        return code + text + RESET if self.color else text

    def draw(self, lines: list[str]) -> None:
        if not self.live:
            self._write("\n".join(lines) + "\n\n")
            return
        width, height = shutil.get_terminal_size()
        # one column and one line to spare: a full last column or line makes terminals scroll
        lines = [clip(line, width - 1) for line in lines[: max(1, height - 1)]]
        parts = [_HIDE_CURSOR]
        if self._drawn:
            parts.append(f"\x1b[{self._drawn}A\r")  # back to the first line of the last frame
        parts += [line + _CLEAR_LINE_END + "\n" for line in lines]
        parts.append(_CLEAR_SCREEN_END)
        self._write("".join(parts))
        self._drawn = len(lines)

    def release(self) -> None:
        """Leave the last frame on screen; what is said next goes below it."""
        if self.live:
            self._write(_SHOW_CURSOR)
        self._drawn = 0

    def _write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:  # keep stopping everything even if nobody can read it
            self.closed = True


def clip(line: str, width: int) -> str:
    """``line`` cut to ``width`` visible characters, its ANSI codes kept."""
    out: list[str] = []
    room = width
    for part in _ANSI.split(line):
        if _ANSI.fullmatch(part):
            out.append(part)
        else:
            out.append(part[: max(0, room)])
            room -= len(part)
    return "".join(out)


@contextlib.contextmanager
def keys_pressed() -> Iterator[int | None]:
    """stdin's descriptor in cbreak mode (one key at a time, no echo; Ctrl-C still signals),
    restored on exit; None when stdin is not a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
