"""Progress reporting: a tqdm bar on an interactive terminal, plain log lines otherwise (CI, DVC)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(
        self, total: int, desc: str, initial: int = 0, enabled: bool = True, log_every_s: float = 10.0
    ):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.desc, self.total, self.count = desc, total, initial
        self.log_every_s, self._last_log = log_every_s, time.monotonic()
        self._bar = None
        self._postfix: dict = {}  # shown with every update until changed (see show)
        if self.interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def show(self, **postfix) -> None:
        """Values shown with the progress from now on (the loop sets them when it records, not at
        every step: reading a loss from the device at every step would wait for the step)."""
        self._postfix = postfix
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def update(self, n: int = 1, **postfix) -> None:
        self.count += n
        if postfix:
            self.show(**postfix)
        postfix = self._postfix
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (
            time.monotonic() - self._last_log >= self.log_every_s or self.count == self.total
        ):
            self._last_log = time.monotonic()
            extra = " ".join(f"{k}={_short(v)}" for k, v in postfix.items())
            print(f"{self.desc}: {self.count}/{self.total} {extra}".rstrip(), file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
