"""Reinforcement-learning algorithms built on the probe: CorR-PO reward shaping
and group advantages (:mod:`.corrpo`)."""
