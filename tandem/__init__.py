"""Tandem: a Kubernetes-native control plane for LLM serving.

The components live in top-level folders of the repository (``sim/``, ``router/``,
``operator/``, ``autoscaler/``) and are namespace portions of this package. In a wheel the
build copies them under ``tandem/``; in a source checkout (``pip install -e .``) setuptools'
editable finder cannot resolve nested namespace portions, so the repository root is added to
this package's search path here. The folders have no top-level ``__init__.py``, so nothing named
``operator`` becomes importable on its own.
"""

from pathlib import Path

__version__ = "0.1.0"

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "router").is_dir():
    __path__.append(str(_checkout))
