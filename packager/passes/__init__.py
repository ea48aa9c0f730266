"""Optimisation passes, Olive style: each a small unit with a typed config, recorded in the manifest.

A pass takes an ``onnx.ModelProto`` and a :class:`~packager.passes.base.PassContext` and returns
a new model. :meth:`Pass.record` gives the :class:`~edgeota_contract.manifest.PassRecord`
(name + config) that goes into the bundle manifest, in order.
"""

from packager.passes.base import Pass, PassContext, PassFailed

__all__ = ["Pass", "PassContext", "PassFailed"]
