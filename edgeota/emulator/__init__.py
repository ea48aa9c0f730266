"""A light device emulator: many thousands of contract-speaking devices per process, to measure the server.

See :mod:`edgeota.emulator.device` (one device) and :mod:`edgeota.emulator.fleet` (many, on one shared MQTT
loop). Real agents (:mod:`edgeota.fleet`) remain the measure of agent behaviour; results say which was used.
"""
