"""Package layout: every ``gateway*`` package, plus ``rules/`` installed as ``gateway/bundled_rules``."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gateway*"]), "gateway.bundled_rules"],
    package_dir={"gateway.bundled_rules": "rules"},
)
