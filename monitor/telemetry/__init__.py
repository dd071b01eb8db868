"""Getting records to the server: the wire format (:mod:`.wire`), retry policy
(:mod:`.retry`), the on-disk spool (:mod:`.spool`) and the non-blocking gRPC
client (:mod:`.client`)."""
