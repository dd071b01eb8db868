"""The applications: the command line (:mod:`.cli`) and its commands (demo with
its RL loop and webhook receiver, fingerprint, run, runs, show), the HTML report,
progress output, toy models and data (:mod:`.toy`) and examples. The only part of
the core that may import ``inversion_monitor.server`` or ``inversion_monitor.callbacks``."""
