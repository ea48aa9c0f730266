"""The update path: signed commands (:mod:`.commands`), the pure state machine (:mod:`.machine`), checks,
download, TUF repository check, the executor and its steps, the trial window, and start-up repair (:mod:`.repair`)."""
