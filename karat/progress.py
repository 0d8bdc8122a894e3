"""Progress bars belong on a terminal (issue 21): written to a log file, every redraw of a tqdm bar is kept, one line
per iteration. A bar is therefore drawn only where someone watches it (a terminal, a Jupyter kernel); a log file gets
the one line per epoch (or per stage) that its callers log either way."""
from __future__ import annotations

import sys
from typing import Optional, TextIO


def on_terminal(stream: Optional[TextIO] = None) -> bool:
    """Whether a progress bar on ``stream`` (default: tqdm's, stderr, as it is now) is seen as it redraws."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        tty = bool(isatty and isatty())
    except ValueError:  # a closed stream
        tty = False
    return tty or "ipykernel" in sys.modules  # Jupyter redraws bars in place too (tqdm.auto: a widget)
