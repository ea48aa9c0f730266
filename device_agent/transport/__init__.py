"""How the agent talks to the server: the :class:`~.base.Transport` seam, MQTT (:mod:`.mqtt`), HTTP command
polling (:mod:`.poll`), the choice between them (:mod:`.factory`), the one HTTP client (:mod:`.http`) and the
outbox that re-sends reports until they are acknowledged (:mod:`.outbox`)."""
