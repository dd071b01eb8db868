"""The applications: the command line (:mod:`.cli`) and its commands (demo,
fingerprint, show, runs, run), and the HTML report. The only part of the core
that may import ``inversion_monitor.server`` or ``inversion_monitor.callbacks``."""
