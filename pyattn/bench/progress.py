"""A progress bar on stderr: tqdm when it is installed, else a one-line bar of our own."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, enabled: bool = True, desc: str = "pyattn-bench"):
        # a bar is for a terminal: in a log file or a pipe it would be a screenful of carriage returns
        enabled = enabled and sys.stderr.isatty()
        self.total, self.done, self.enabled, self.desc = total, 0, enabled, desc
        self.start = time.perf_counter()
        self._tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(self, text: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)
            self._tqdm.update(1)
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        line = f"\r{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s {text}"
        sys.stderr.write(line[:120].ljust(120))
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\r" + " " * 120 + "\r")
            sys.stderr.flush()
