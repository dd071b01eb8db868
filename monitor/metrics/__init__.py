"""Metric math on tensors, no I/O: correlation coefficients and Fisher intervals
(:mod:`.correlation`), the inversion statistics (:mod:`.stats`), token entropy
(:mod:`.entropy`), nuclear/Frobenius/l1 norms of outer-product sums
(:mod:`.norms`) and the entropy covariance (:mod:`.covariance`).

Importing this package loads no torch; the constants below are shared with
:class:`~inversion_monitor.config.MonitorConfig`.
"""

MIN_CORRELATION_PAIRS = 4
"""Fewest (entropy, score) pairs a correlation and its Fisher-z interval are computed from."""
