"""Getting records to the server: the wire format (:mod:`.wire`), retry policy
(:mod:`.retry`), the write-ahead spool (:mod:`.spool`), the one channel and
credentials factory (:mod:`.transport`), the send window (:mod:`.window`), the
sender thread (:mod:`.sender`), the non-blocking client (:mod:`.client`) and a
reader for GetRun/ListRuns (:mod:`.reader`)."""
