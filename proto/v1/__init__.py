"""Version 1 of the wire contract (package ``inversion_monitor.v1``).

>>> from inversion_monitor.proto.v1 import monitor_pb2
>>> monitor_pb2.StepRecord(run_id="r", rank=0, sequence=1, step=10).sequence
1
"""
