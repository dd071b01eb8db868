"""The measurement: where each architecture keeps its attention projections
(:mod:`.architectures`), which tokens to probe (:mod:`.sampling`), capturing the
training batch (:mod:`.capture`), packed documents (:mod:`.packing`), sharded
parameters (:mod:`.sharding`), per-token entropy and logit-gradient norms
(:mod:`.gradients`: the public API and the choice of path; one probe forward and
its plan in :mod:`.forward`; the batched general path in :mod:`.rows`; the one-pass
last block in :mod:`.last_block`, replaying the attention in :mod:`.attention_replay`
(recorded by :mod:`.attention_capture`) and carrying K and V back in
:mod:`.key_value_norms`), counting a probe's ops, syncs and solves (:mod:`.op_counts`), the
training forward's hidden states reused below the
lowest probed block (:mod:`.prefix_capture`) and the brute-force ground truth
(:mod:`.reference`)."""
