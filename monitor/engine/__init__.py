"""The engine: decides when to probe (:mod:`.schedule`), runs the probe on the
captured batch, aggregates the statistics and hands records to the sinks
(:mod:`.training_monitor`). Framework adapters in ``inversion_monitor.callbacks``
drive it."""
