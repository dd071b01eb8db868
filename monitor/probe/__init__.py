"""The measurement: where each architecture keeps its attention projections
(:mod:`.architectures`), which tokens to probe (:mod:`.sampling`), capturing the
training batch (:mod:`.capture`), packed documents (:mod:`.packing`), sharded
parameters (:mod:`.sharding`), per-token entropy and logit-gradient norms
(:mod:`.gradients`, with the one-pass last block in :mod:`.last_block` and
:mod:`.attention_capture`), the training forward's hidden states reused below the
lowest probed block (:mod:`.prefix_capture`) and the brute-force ground truth
(:mod:`.reference`)."""
