"""The engine: decides when to probe (:mod:`.schedule`), makes every rank of a
distributed job agree on it (:mod:`.rank_agreement`), runs the probe on the
captured batch, aggregates the statistics (:mod:`.training_monitor`) and hands
records to the sinks: trainer logs, JSONL, gRPC (:mod:`.sinks`). Framework
adapters in ``inversion_monitor.callbacks`` drive it."""
