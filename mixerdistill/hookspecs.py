"""The hooks a mixerdistill plugin can implement.

A plugin is a module (or object) exposed through the ``mixerdistill`` entry-point group whose
functions are decorated with ``mixerdistill.hookimpl``. Each hook receives a ``register`` callable;
call it once per thing the plugin provides: ``register(name, thing)``. Duplicate names, unknown
names and validation are handled by the core registry, never by the plugin.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mixerdistill")
hookimpl = pluggy.HookimplMarker("mixerdistill")


@hookspec
def register_mixers(register):
    """Register sequence mixers: ``register("name", MixerClass)``.

    ``MixerClass`` subclasses ``mixerdistill.mixer.SequenceMixer`` and defines a pydantic ``Config``;
    the recipe's ``student.mixer`` block (minus ``name``) is validated against it.
    """


@hookspec
def register_teachers(register):
    """Register teacher adapters: ``register("name", adapter_instance)``.

    An adapter (``mixerdistill.teacher.TeacherAdapter``, usually a ``DeclaredAdapter`` subclass) knows one
    Hugging Face model family: where its decoder blocks, attention modules, q/k/v/o weights, q/k norms,
    rotary embedding and norms live, and what its attention computes (docs/teachers.md).
    """


@hookspec
def register_stages(register):
    """Register training stages: ``register("name", StageClass)``.

    ``StageClass`` subclasses ``mixerdistill.stages.Stage``: it names the trainable parameters and
    computes a loss for one batch; the shared training loop does the rest.
    """


@hookspec
def register_datasets(register):
    """Register data sources: ``register("name", DataSourceClass)``.

    ``DataSourceClass`` subclasses ``mixerdistill.data.DataSource`` and yields documents (strings) for a
    training split and a held-out split that training never sees.
    """
