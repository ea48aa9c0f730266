"""The update path: pure state machine (:mod:`.machine`), checks, download and the executor."""
