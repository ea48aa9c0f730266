"""Serving inference: the runtime that swaps models atomically and caches ONNX Runtime sessions (:mod:`.runtime`)
and the shadow runner for candidate models (:mod:`.shadow`)."""
