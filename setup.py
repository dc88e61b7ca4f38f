"""Package discovery (everything else is in pyproject.toml).

Every package under ``mixerdistill/`` is found, so a new subpackage ships without editing a list;
the top-level ``plugins/`` folder installs as ``mixerdistill_plugins`` and ``recipes/`` as
``mixerdistill.recipes`` (``package-dir`` in pyproject.toml).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["mixerdistill", "mixerdistill.*"])
setup(packages=[*packages, "mixerdistill_plugins", "mixerdistill.recipes"])
