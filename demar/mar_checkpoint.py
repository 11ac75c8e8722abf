"""Official MAR checkpoints (LTH14/mar) <-> this project's MAR row.

An official checkpoint is a torch file holding ``{"model": state_dict,
"model_ema": state_dict, "optimizer", "epoch", "scaler", "args"}`` (its
``util/misc.py``); released models are evaluated with ``"model_ema"``. The state
dict of ``models/mar.py`` (MAR-B/L/H differ only in depth and widths; D = width,
N = tokens, d = token dim, S = 64 buffer tokens, w = MLP-head width):

```
class_emb.weight                                   [1000, D]
fake_latent                                        [1, D]
z_proj.weight / .bias                              [D, d] / [D]
z_proj_ln.weight / .bias                           [D]
encoder_pos_embed_learned                          [1, S + N, D]
encoder_blocks.{i}.norm1.weight / .bias            [D]            (timm ViT Block)
encoder_blocks.{i}.attn.qkv.weight / .bias         [3D, D] / [3D]
encoder_blocks.{i}.attn.proj.weight / .bias        [D, D] / [D]
encoder_blocks.{i}.norm2.weight / .bias            [D]
encoder_blocks.{i}.mlp.fc1.weight / .bias          [4D, D] / [4D]
encoder_blocks.{i}.mlp.fc2.weight / .bias          [D, 4D] / [D]
encoder_norm.weight / .bias                        [D]
decoder_embed.weight / .bias                       [D, D] / [D]
mask_token                                         [1, 1, D]
decoder_pos_embed_learned                          [1, S + N, D]
decoder_blocks.{i}.*                               (as encoder_blocks)
decoder_norm.weight / .bias                        [D]
diffusion_pos_embed_learned                        [1, N, D]
diffloss.net.time_embed.mlp.0.weight / .bias       [w, 256] / [w]
diffloss.net.time_embed.mlp.2.weight / .bias       [w, w] / [w]
diffloss.net.cond_embed.weight / .bias             [w, D] / [w]
diffloss.net.input_proj.weight / .bias             [w, d] / [w]
diffloss.net.res_blocks.{j}.in_ln.weight / .bias   [w]
diffloss.net.res_blocks.{j}.mlp.0.weight / .bias   [w, w] / [w]
diffloss.net.res_blocks.{j}.mlp.2.weight / .bias   [w, w] / [w]
diffloss.net.res_blocks.{j}.adaLN_modulation.1.weight / .bias   [3w, w] / [3w]
diffloss.net.final_layer.linear.weight / .bias     [2d, w] / [2d]
diffloss.net.final_layer.adaLN_modulation.1.weight / .bias      [2w, w] / [2w]
```

The backbone's names are ours under the prefix ``backbone.``; ``diffloss.net.``
is our MLP head's prefix ``diffusion_head.`` (same names inside). Nothing else is
renamed, so the mapping is two prefix substitutions.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from demar.config import validate
from demar.model import DeMAR, ModelConfig
from demar.sizes import SIZES

__all__ = [
    "check_state_dict",
    "from_official",
    "infer_config",
    "load_official",
    "load_official_state",
    "to_official",
]

# (official prefix, our prefix); the first match wins, so the longer prefix comes first.
_PREFIXES = (("diffloss.net.", "diffusion_head."), ("", "backbone."))


def from_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official MAR state dict to ours (``diffloss.net.`` -> ``diffusion_head.``, rest -> ``backbone.``).

    Args:
        state: the official state dict (``checkpoint["model"]`` or ``["model_ema"]``).
    """
    out = {}
    for key, value in state.items():
        for official, ours in _PREFIXES:
            if key.startswith(official):
                out[ours + key[len(official) :]] = value
                break
    return out


def to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename our MAR row's state dict to the official layout (inverse of :func:`from_official`).

    Args:
        state: ``DeMAR.state_dict()`` of a model with the MLP head and no denoising head.
    """
    out = {}
    for key, value in state.items():
        for official, ours in _PREFIXES:
            if key.startswith(ours):
                out[official + key[len(ours) :]] = value
                break
        else:
            raise ValueError(f"key {key!r} has no place in the official MAR layout (MAR row only)")
    return out


def load_official_state(path: str | os.PathLike[str], use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Read the official-layout state dict from an official checkpoint file.

    The file is read with ``weights_only=True``; the ``argparse.Namespace`` MAR stores
    under ``"args"`` is allowed explicitly.

    Args:
        path: the checkpoint (``{"model": ..., "model_ema": ...}``).
        use_ema: take ``"model_ema"`` (default True, as MAR's evaluation) rather than ``"model"``.
    """
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    key = "model_ema" if use_ema else "model"
    if not isinstance(ckpt, dict) or ckpt.get(key) is None:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: no {key!r} entry in this MAR checkpoint (found {found})")
    return dict(ckpt[key])


def _count_blocks(state: Mapping[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def infer_config(state: Mapping[str, torch.Tensor], **overrides: Any) -> ModelConfig:
    """The MAR-row :class:`ModelConfig` an official state dict was built with.

    Shapes give the widths, depths, classes, tokens and buffer; the number of heads,
    which no shape shows, comes from the registered size of the same width and depth
    (as do the Transformer head's fields, unused by the MAR row).

    Args:
        state: an official-layout state dict.
        **overrides: fields to set explicitly (e.g. ``num_heads``).
    """
    try:
        num_classes, width = state["class_emb.weight"].shape
        token_dim = state["z_proj.weight"].shape[1]
        seq_len = state["diffusion_pos_embed_learned"].shape[1]
        buffer_size = state["encoder_pos_embed_learned"].shape[1] - seq_len
        mlp_ratio = state["encoder_blocks.0.mlp.fc1.weight"].shape[0] / width
        head_width = state["diffloss.net.input_proj.weight"].shape[0]
        learn_sigma = state["diffloss.net.final_layer.linear.weight"].shape[0] == 2 * token_dim
    except KeyError as err:
        raise ValueError(f"not an official MAR state dict: missing {err}") from None
    depth = _count_blocks(state, "encoder_blocks.")
    fields: dict[str, Any] = {
        "token_dim": token_dim,
        "seq_len": seq_len,
        "width": width,
        "encoder_depth": depth,
        "decoder_depth": _count_blocks(state, "decoder_blocks."),
        "mlp_ratio": mlp_ratio,
        "buffer_size": buffer_size,
        "num_classes": num_classes,
        "diffusion_head": "mlp",
        "denoising_head": False,
        "mlp_head": {"depth": _count_blocks(state, "diffloss.net.res_blocks."), "width": head_width},
        "diffusion": {"learn_sigma": learn_sigma},
    }
    match = [s for s in SIZES.values() if s.width == width and s.depth == depth]
    if match:  # the registered size supplies what shapes cannot show (heads, its other head)
        base = match[0].model_fields()
        fields = {**base, **fields, "mlp_head": {**base["mlp_head"], **fields["mlp_head"]}}
    elif "num_heads" not in overrides:
        raise ValueError(f"no registered size has width {width} and depth {depth}: pass num_heads")
    return validate(ModelConfig, {**fields, **overrides}, source="official MAR state dict")


def check_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise a ``ValueError`` naming ``source`` and listing every missing, unexpected and mis-shaped key.

    Args:
        state: a state dict in our layout.
        model: the model it should load into.
        source: the file (or other origin) quoted in the message.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source}: the MAR state dict does not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items)
        raise ValueError("\n".join(lines))


def load_official(
    path: str | os.PathLike[str],
    cfg: ModelConfig | None = None,
    use_ema: bool = True,
    map_location: str | torch.device = "cpu",
) -> DeMAR:
    """Build our MAR row from an official LTH14/mar checkpoint, in eval mode.

    Args:
        path: the official checkpoint file.
        cfg: the model config (default ``None``: :func:`infer_config` from the shapes).
            Must be the MAR row (MLP head, no denoising head).
        use_ema: load the EMA weights (default True).
        map_location: where the model is placed (default ``"cpu"``).
    """
    official = load_official_state(path, use_ema=use_ema)
    if cfg is None:
        cfg = infer_config(official)
    if cfg.diffusion_head != "mlp" or cfg.denoising_head:
        raise ValueError(f"{path}: official MAR checkpoints hold the MAR row only (MLP head, no denoising head)")
    with torch.device("meta"):
        model = DeMAR(cfg)
    state = from_official(official)
    check_state_dict(state, model, str(path))
    model.load_state_dict(state, assign=True)
    return model.to(map_location).eval()
