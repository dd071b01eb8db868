"""The measurement: where each architecture keeps its attention projections
(:mod:`.architectures`), which tokens to probe (:mod:`.sampling`), capturing the
training batch (:mod:`.capture`), per-token entropy and logit-gradient norms
(:mod:`.gradients`) and the brute-force ground truth (:mod:`.reference`)."""
