"""Build hook for the optional C telemetry path (everything else is in pyproject.toml).

``optional=True``: without a compiler the install still succeeds and the agent records telemetry in
Python (:mod:`device_agent.telemetry`), only slower.
"""

import numpy
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "device_agent._telemetry_native",
            ["device_agent/_telemetry_native.c"],
            include_dirs=[numpy.get_include()],  # numpy's C API (a build requirement in pyproject.toml)
            optional=True,
            extra_compile_args=["-O2"],
        )
    ]
)
