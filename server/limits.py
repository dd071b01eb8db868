"""Small bounds the server keeps per process: rate-limited error logs, in-flight request bytes.

:class:`RateLimitedLog` logs every kind of failure at once, and its repeats at
most once per interval (the ones in between are counted in the next line), so
a failing listener neither floods the log nor hides its later, different errors.
:class:`InflightBytes` caps the bytes of requests held at once (parsed and
waiting for the writer), so many concurrent large pushes cannot grow memory
past the cap: the one over it is refused with RESOURCE_EXHAUSTED and retried.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from inversion_monitor.server.errors import ResourceExhausted


class RateLimitedLog:
    """``exception(key, ...)`` logs each key at most once per ``interval_s``.

    A new key (another listener, another exception type) is logged at once;
    repeats of a key within the interval are counted and the count is named in
    that key's next line. At most ``max_keys`` keys are remembered.

    >>> import logging
    >>> clock = iter([0.0, 1.0, 2.0, 3.0, 11.0]).__next__
    >>> limited = RateLimitedLog(logging.getLogger("demo"), interval_s=10.0, clock=clock)
    >>> [limited.exception(key, "failed: %s", key) for key in "aabaa"]
    [True, False, True, False, True]
    """

    def __init__(
        self,
        log: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 256,
    ) -> None:
        self._log = log
        self._interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        # key -> (time of its last line, repeats not logged since)
        self._seen: dict[object, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def exception(self, key: object, message: str, *args: object) -> bool:
        """Log ``message`` with the current exception unless ``key`` was logged recently."""
        now = self._clock()
        with self._lock:
            last, skipped = self._seen.get(key, (None, 0))
            if last is not None and now - last < self._interval_s:
                self._seen[key] = (last, skipped + 1)
                return False
            if last is None and len(self._seen) >= self._max_keys:
                self._seen.clear()
            self._seen[key] = (now, 0)
        if skipped:
            message += f" ({skipped} more since the last such line, not logged)"
        self._log.exception(message, *args)
        return True


class InflightBytes:
    """Bytes of requests held at once, capped at ``limit`` (event-loop use: no lock needed).

    >>> held = InflightBytes(100)
    >>> with held.hold(60):
    ...     held.current
    60
    >>> with held.hold(60), held.hold(60):  # doctest: +IGNORE_EXCEPTION_DETAIL
    ...     pass
    Traceback (most recent call last):
    inversion_monitor.server.errors.ResourceExhausted: ...
    >>> held.current
    0
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.current = 0

    @contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Count ``size`` bytes while inside; RESOURCE_EXHAUSTED if that passes the limit.

        One request alone is always let through (it fits the message limit).
        """
        if self.current and self.current + size > self.limit:
            raise ResourceExhausted(
                f"server busy: {self.current} bytes of requests in flight "
                f"(max_inflight_push_bytes={self.limit}); retry shortly",
                retry_after_s=0.25,
            )
        self.current += size
        try:
            yield
        finally:
            self.current -= size
