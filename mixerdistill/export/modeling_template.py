"""A student distilled by mixerdistill, as a transformers model: the teacher's architecture with sequence
mixers in place of (some of) its attention modules.

This file is copied into an exported model folder as ``modeling_mixerdistill.py``; the imports marked
``export:`` are rewritten to the teacher's model class, the student's mixer class and the classes of its
parts (a composite mixer's). Beside it, the
``mixerdistill_*.py`` files hold the mixer code (PyTorch reference paths; fused kernels when mamba-ssm /
flash-linear-attention / causal-conv1d are installed and the model is on CUDA). It needs only torch and
transformers.
"""

from types import SimpleNamespace

from transformers import LlamaForCausalLM as TeacherForCausalLM  # export: the teacher's model class

from .configuration_mixerdistill import MixerdistillConfig
from .mixerdistill_mixer import AttentionGeometry
from .mixerdistill_mixer_layer import MixerLayer
from .mixerdistill_plugins_discrete_mamba2 import DiscreteMamba2 as Mixer  # export: the student's mixer class

MIXER_CLASSES = {}  # export: the mixer classes the student's mixer builds by name


class MixerOptions(SimpleNamespace):
    """A mixer's options as attributes (what mixerdistill validates with the mixer's pydantic ``Config``);
    ``mixer_classes``: the classes a composite mixer builds its parts from (mixerdistill's registry)."""

    mixer_classes = MIXER_CLASSES

    def model_dump(self) -> dict:
        return dict(vars(self))


class MixerdistillForCausalLM(TeacherForCausalLM):
    """The teacher's causal LM with a ``MixerLayer`` at every module path in ``config.mixer_layers``.

    ``generate()`` keeps one constant-size recurrent state per mixer layer in its cache (keys and values only
    for kept attention layers); a left-padded batch gives each row the tokens it would get alone.
    """

    config_class = MixerdistillConfig

    def __init__(self, config: MixerdistillConfig):
        super().__init__(config)
        options = config.mixer_options or {}
        for path, geometry in (config.mixer_layers or {}).items():
            geometry = AttentionGeometry(**geometry)
            mixer = Mixer(geometry, MixerOptions(**options))
            self.set_submodule(path, MixerLayer(mixer, geometry.layer_idx))
