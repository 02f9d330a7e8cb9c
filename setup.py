"""The wheel's package list: migrt and its subpackages, plus the bundled plugins and
CRIU action scripts (plugins/ and hooks/, installed as migrt_plugins/ and migrt_hooks/;
see pyproject.toml). Everything else is in pyproject.toml."""
from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["migrt", "migrt.*"], exclude=["migrt.*.__pycache__"])
      + ["migrt_plugins", "migrt_hooks"])
