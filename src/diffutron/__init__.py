"""diffutron: masked diffusion language models for Turkish (train, sample, evaluate, serve)."""

from .errors import DiffutronError
from .lm import Completion, DiffusionLM
from .objective import mdlm_loss
from .sampling import GenerationOutput, SamplerConfig, generate

__version__ = "0.1.0"

__all__ = ["DiffusionLM", "Completion", "SamplerConfig", "GenerationOutput", "generate", "mdlm_loss",
           "DiffutronError", "__version__"]
