"""Package layout: every ``gateway*`` package, plus ``rules/`` installed as ``gateway/bundled_rules``.

``gateway.core._native`` (``gateway/core/_native.c``) is built when a C compiler is there and
left out when it is not (``optional=True``): the Python path of ``gateway.core.native`` then
runs alone.
"""

from setuptools import Extension, find_packages, setup

setup(
    packages=[*find_packages(include=["gateway*"]), "gateway.bundled_rules"],
    package_dir={"gateway.bundled_rules": "rules"},
    ext_modules=[
        Extension(
            "gateway.core._native",
            sources=["gateway/core/_native.c"],
            extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=vla"],
            optional=True,
        ),
    ],
)
