"""A model's module tree without its weights, for tracing a model of any size in the memory of a small one.

Parameters are FakeTensors (shape, dtype and device, no storage); the non-persistent buffers transformers computes
when it builds a model (rotary frequencies) are real, computed by the model's own ``_init_weights`` as
``from_pretrained`` does for a model built on the meta device. ``trace(loaded, decode_check=False)`` of it gives
the graph the real model gives (tests/frontend/test_skeleton.py: every test architecture); its constants are
FakeTensors until real weights are bound to them, so the one-token decode check waits for those.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lowbit.frontend.load import model_class, quiet_transformers


def weightless_model(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``config``'s model in eval mode with FakeTensor parameters of ``dtype`` and real non-persistent buffers."""
    with quiet_transformers(), torch.device("meta"):
        model = model_class(config)._from_config(config, dtype=dtype)
    model.eval()
    owners = {}
    for name, buf in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[attr] = torch.empty_like(buf, device="cpu")
        owners[owner] = module
    with quiet_transformers():
        for module in owners.values():
            model._init_weights(module)
    drop_weights(model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def drop_weights(model: torch.nn.Module, names=None) -> None:
    """Replace ``model``'s parameters (all, or those ``names`` lists) by FakeTensors of their shapes and dtypes:
    their memory is let go."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    for name, p in list(model.named_parameters()):
        if names is not None and name not in names:
            continue
        with fake:
            value = torch.empty(p.shape, dtype=p.dtype, device="cpu")
        set_parameter(model, name, value)


def set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Make ``value`` the parameter ``name`` (a dotted path) of ``model``, frozen."""
    owner, _, attr = name.rpartition(".")
    model.get_submodule(owner)._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
