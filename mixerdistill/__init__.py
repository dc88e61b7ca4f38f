"""mixerdistill: distil a pretrained Transformer into subquadratic sequence mixers (MOHAWK).

The public API for plugin authors is importable from here::

    from mixerdistill import hookimpl, SequenceMixer, MixerConfig, AttentionGeometry, Stage, TeacherAdapter

``hookimpl`` is imported at once; the others on first use, so ``import mixerdistill`` (and the CLI's start)
does not pay for torch until a name that needs it is touched.
"""

from __future__ import annotations

from importlib import import_module

from mixerdistill.hookspecs import hookimpl

# public name -> module that defines it
_PUBLIC = {
    "SequenceMixer": "mixerdistill.mixer",
    "MixerConfig": "mixerdistill.mixer",
    "AttentionGeometry": "mixerdistill.mixer",
    "AttentionWeights": "mixerdistill.mixer",
    "Stage": "mixerdistill.stages",
    "StageConfig": "mixerdistill.stages",
    "StageContext": "mixerdistill.stages",
    "TeacherAdapter": "mixerdistill.teacher",
    "DataSource": "mixerdistill.data",
    "DataSourceConfig": "mixerdistill.data",
}

__all__ = ["hookimpl", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mixerdistill' has no attribute '{name}'")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
