"""The monitor server: ingests records over gRPC, stores them, exports metrics.

Never imports torch, transformers or lightning, so it starts in well under a
second.
"""
