"""Reinforcement learning beside the probe: RL signals from the trainer's own
tensors, i.e. policy entropy, advantages and Cov(log pi, A) (:mod:`.signals`),
and CorR-PO reward shaping with group advantages (:mod:`.corrpo`)."""
