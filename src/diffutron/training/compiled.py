"""Regional ``torch.compile`` of the encoder layers for training steps (the stage setting ``compile``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..backbone import encoder_of, unwrap
from ..errors import DiffutronError


def encoder_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder's repeated blocks: ``model.layers`` (ModernBERT) or ``encoder.layer`` (BERT)."""
    encoder = encoder_of(model)
    if encoder is None:
        return []
    layers = getattr(encoder, "layers", None)
    if layers is None:
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def compile_encoder_layers(model: nn.Module, *, mode: str | None = None,
                           backend: str = "inductor") -> Callable[[], None]:
    """Compile each encoder layer's forward with ``torch.compile`` for training; returns the undo.

    Regional compilation: the layers share one code object, so every layer of one kind (ModernBERT:
    global / sliding attention, the first layer when its input needs no gradient) reuses one
    compiled graph, and the compile cost is that of a few layers, not of the whole stack. The
    embeddings, the MLM head, the masked-position gather and the loss stay eager (their row count
    changes every step). The compiled forward runs only in training mode with gradients on;
    evaluation and sampling inside a stage run the eager layers, so they add no recompilation.
    Parameters, state-dict keys and the peft / accelerate / DDP wrappers are untouched (the layer
    gets an instance ``forward`` that the undo removes; the undo also resets torch.compile's caches,
    so the next stage in this process starts clean). ``backend``: torch.compile's (tests use
    ``aot_eager``, which generates no code, where they check the wiring only).

    Raises:
        DiffutronError: a model whose encoder layers are not found.
    """
    layers = encoder_layers(model)
    if not layers:
        raise DiffutronError(f"compile: the encoder layers of {type(unwrap(model)).__name__} were not found; "
                             "set compile: false")
    for layer in layers:
        eager = layer.forward
        compiled = torch.compile(eager, backend=backend, mode=mode)

        def forward(*args, _layer=layer, _eager=eager, _compiled=compiled, **kwargs):
            if _layer.training and torch.is_grad_enabled():
                return _compiled(*args, **kwargs)
            return _eager(*args, **kwargs)

        layer.forward = forward  # an instance attribute: the class's forward is untouched

    def undo() -> None:
        for layer in layers:
            if "forward" in vars(layer):
                del layer.forward
        torch._dynamo.reset()

    return undo
