"""Runnable examples that ship with the package.

``python -m inversion_monitor.app.examples.lightning_grpo_corrpo --steps 20``
(the repository's top level is fixed, so examples live here, beside the
adapters they use).
"""
