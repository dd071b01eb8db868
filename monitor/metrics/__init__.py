"""Metric math on tensors, no I/O: rank correlations with confidence intervals
(:mod:`.stats`), token entropy (:mod:`.entropy`), nuclear/Frobenius/l1 norms of
outer-product sums (:mod:`.norms`) and the entropy covariance (:mod:`.covariance`)."""
