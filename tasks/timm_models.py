"""Building the timm model of ``task.kind=vit``: ``timm.create_model`` with the task's settings, a
one-line ``ConfigError`` for what a user can fix (a rejected argument, an offline download, a weights
file that does not fit), and the LoRA wrapping (adapters + the classifier head kept trainable).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from adaptune.common.errors import ConfigError

from .lora import apply_lora
from .vit_data import abs_path as _abs_path, one_line as _one_line

#: **(choice)** The adapted modules when ``task.lora.target_modules`` is null (peft has no default for
#: timm models): ``qkv``, the fused query/key/value projection of every ViT block; as in the LoRA
#: paper, attention only: ``attn.proj``, ``mlp.fc1`` and ``mlp.fc2`` are not adapted unless listed
#: (e.g. ``[qkv,attn.proj,fc1,fc2]``; a bare ``proj`` would also match ``patch_embed.proj``, a Conv2d).
#: Models without ``qkv`` modules (ResNets, ...) must name theirs: else a ConfigError.
TIMM_LORA_TARGETS = ("qkv",)


def classifier_names(model: torch.nn.Module) -> list[str]:
    """The module name(s) of a timm model's classifier head: what its ``pretrained_cfg["classifier"]``
    names (``head`` for ViT, ``fc`` for ResNets, ``head.fc`` for ConvNeXt, ``head`` and ``head_dist``
    for distilled DeiT), else the module ``get_classifier()`` returns."""
    modules = dict(model.named_modules())
    pcfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = pcfg.get("classifier")
    names = [n for n in ([names] if isinstance(names, str) else list(names or ())) if n in modules]
    if not names and callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        names = [n for n, m in modules.items() if n and m is head][:1]
    if not names:
        raise ConfigError(
            f"task.peft=lora: cannot find the classifier head of the timm model "
            f"{type(model).__name__} (no pretrained_cfg['classifier'] nor get_classifier())"
        )
    return names


def build_timm_model(model_cfg: Any, model_kwargs: Mapping[str, Any], num_classes: int, peft: str | None, lora_cfg: Any):
    """``timm.create_model(model_cfg.name, pretrained=..., num_classes=num_classes, img_size=..., **model_kwargs)``,
    wrapped by peft when ``peft == "lora"`` (``lora_cfg``: the task's ``lora`` settings)."""
    import timm

    m = model_cfg
    kwargs = dict(model_kwargs)
    if m.img_size:
        kwargs["img_size"] = tuple(m.img_size) if isinstance(m.img_size, (list, tuple)) else int(m.img_size)
    pretrained = bool(m.pretrained) or bool(m.pretrained_file)
    if m.pretrained_file:
        kwargs["pretrained_cfg_overlay"] = {"file": str(_abs_path(m.pretrained_file))}
    try:
        model = timm.create_model(m.name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as err:  # an argument the model does not take
        raise ConfigError(
            f"timm model '{m.name}' rejected task.model.img_size/kwargs ({_one_line(err)}); "
            f"e.g. set task.model.img_size=null for models without img_size"
        ) from None
    except Exception as err:
        if pretrained and not m.pretrained_file and _is_network_error(err):
            raise ConfigError(
                f"task.model.pretrained=true: cannot download the pretrained weights of '{m.name}' "
                f"({_one_line(err)}); go online, set task.model.pretrained_file=<local weights>, or train "
                f"from scratch with task.model.pretrained=false"
            ) from None
        if m.pretrained_file and isinstance(err, (OSError, RuntimeError, KeyError)):
            raise ConfigError(
                f"task.model.pretrained_file={m.pretrained_file}: cannot load it into '{m.name}' ({_one_line(err)})"
            ) from None
        raise
    if peft == "lora":  # adapters + the head (peft modules_to_save); tasks/lora.py
        lora, default = lora_cfg, not lora_cfg.target_modules
        if default:
            lora = dataclasses.replace(lora, target_modules=list(TIMM_LORA_TARGETS))
        head = classifier_names(model)
        try:
            model = apply_lora(model, lora, task_type=None, modules_to_save=head)
        except ConfigError as err:
            if not default:
                raise
            raise ConfigError(
                f"{err} (task.lora.target_modules=null means {list(TIMM_LORA_TARGETS)} for timm "
                f"models: list the modules of '{m.name}' to adapt)"
            ) from None
    return model


def _is_network_error(err: BaseException) -> bool:
    """True for errors of a failed download (offline, DNS, HTTP), as raised by urllib, requests,
    httpx or huggingface_hub."""
    import urllib.error

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        module = type(err).__module__ or ""
        if isinstance(err, (urllib.error.URLError, ConnectionError, TimeoutError)) or module.split(".")[0] in (
            "huggingface_hub",
            "requests",
            "httpx",
            "urllib3",
            "socket",
        ):
            return True
        if isinstance(err, OSError) and (
            "connect" in str(err).lower() or "offline" in str(err).lower() or "resolve" in str(err).lower()
        ):
            return True
        err = err.__cause__ or err.__context__
    return False
