"""Configuration of a student exported by mixerdistill: its teacher's configuration plus where the mixers sit.

This file is copied into an exported model folder as ``configuration_mixerdistill.py``; the import marked
``export:`` is rewritten to the teacher's configuration class. It needs only transformers.
"""

from transformers import LlamaConfig as TeacherConfig  # export: the teacher's configuration class


class MixerdistillConfig(TeacherConfig):
    """The teacher's configuration, and:

    mixer          the mixer family's name in mixerdistill (e.g. ``discrete_mamba2``)
    mixer_options  the mixer's validated options (chunk size, state size, kernel choice, …)
    mixer_layers   {module path of a replaced attention module: its geometry (AttentionGeometry fields)};
                   attention modules not listed are the teacher's, kept
    """

    model_type = "mixerdistill"
    mixer: str = ""
    mixer_options: dict | None = None
    mixer_layers: dict | None = None
