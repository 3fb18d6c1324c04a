"""Typed dataclasses from plain data (YAML, JSON): the one coercion, loud on unknown keys and bad types.

The bottom of the config stack: `pipeline.model.config` (the architecture's schema) and
`pipeline.config` (the pipeline's schema, YAML files, overrides, validation) both build on it.
A dataclass may define `expand_plain(data, prefix) -> data` (a classmethod, run on the plain data
first) and `record_given(names)` (told which fields the data set); nothing else is special-cased.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config value or file that cannot be used; the message names the key or file."""


# The names timm, Hugging Face and DeepSpeed give what vitpipe calls otherwise; spelling distance
# alone answers pretrain.batch_size with 'image_size'. A name leads to those of its keys that exist
# where it was written (model.hidden_size -> width, pretrain.batch_size -> global_batch).
_KNOWN_AS = {
    **dict.fromkeys(("batch_size", "train_batch_size", "batch"), ("global_batch", "micro_batch")),
    **dict.fromkeys(("train_micro_batch_size_per_gpu", "micro_batch_size", "per_device_batch_size",
                     "per_device_train_batch_size"), ("micro_batch",)),
    **dict.fromkeys(("gradient_accumulation_steps", "accum_steps", "accumulation_steps"), ("grad_accum",)),
    **dict.fromkeys(("learning_rate", "base_lr", "blr"), ("lr",)),
    **dict.fromkeys(("epochs", "num_epochs", "max_steps", "total_steps", "num_steps", "iterations",
                     "train_steps"), ("steps",)),
    **dict.fromkeys(("warmup", "warmup_epochs", "num_warmup_steps"), ("warmup_steps",)),
    **dict.fromkeys(("hidden_size", "embed_dim", "dim", "d_model", "hidden_dim"), ("width",)),
    **dict.fromkeys(("num_hidden_layers", "num_layers", "layers", "n_layers"), ("depth",)),
    **dict.fromkeys(("num_attention_heads", "num_heads", "n_heads"), ("heads",)),
    **dict.fromkeys(("intermediate_size", "mlp_ratio", "ffn_dim"), ("mlp_dim",)),
    **dict.fromkeys(("patch", "patch_sz"), ("patch_size",)),
    **dict.fromkeys(("img_size", "input_size", "resolution", "size"), ("image_size",)),
    **dict.fromkeys(("num_channels", "in_chans", "channels"), ("in_channels",)),
    **dict.fromkeys(("drop_rate", "hidden_dropout_prob", "dropout_rate"), ("dropout",)),
    **dict.fromkeys(("drop_path_rate", "stochastic_depth"), ("drop_path",)),
    **dict.fromkeys(("layer_norm_eps", "eps"), ("norm_eps",)),
    **dict.fromkeys(("wd",), ("weight_decay",)),
    **dict.fromkeys(("max_grad_norm", "clip_grad_norm", "gradient_clipping", "grad_clip"), ("clip_grad",)),
    **dict.fromkeys(("num_workers",), ("workers",)),
    **dict.fromkeys(("smoothing",), ("label_smoothing",)),
    **dict.fromkeys(("zero", "zero_optimization"), ("zero_stage",)),
    **dict.fromkeys(("fp16", "bf16", "amp", "mixed_precision", "dtype"), ("precision",)),
    **dict.fromkeys(("world_size", "nproc_per_node", "gpus"), ("ranks",)),
    **dict.fromkeys(("lr_scheduler", "scheduler", "sched"), ("schedule",)),
    **dict.fromkeys(("opt",), ("optimizer",)),
}


def _suggest(key: str, valid: list[str]) -> str:
    known = [k for k in _KNOWN_AS.get(key.lower(), ()) if k in valid]
    if known:
        unit = " (counted in optimizer steps, not epochs)" if "epoch" in key.lower() else ""
        hint = f"vitpipe calls it {' or '.join(repr(k) for k in known)}{unit}; "
    else:
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"did you mean '{near[0]}'? " if near else ""
    return f"{hint}valid keys: {', '.join(valid)}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the type `hint`; return it (ints accepted where floats are expected)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return from_dict(hint, value, prefix=key + ".")
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(hint)}, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-3 (no dot) as a string; users mean a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan/.inf: no setting means them, and NaN fails only in training
            raise ConfigError(f"{key}: expected a finite number, got {value!r}; write a number such as 1e-3")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")  # a schema bug, not user input


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict; unknown keys and wrong types are `ConfigError`s."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if hasattr(cls, "expand_plain"):  # e.g. ModelConfig: a variant name fills the fields left unset
        data = cls.expand_plain(data, prefix)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; {_suggest(key, names)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    if hasattr(obj, "record_given"):  # e.g. ModelConfig: which fields the data set (given_fields)
        obj.record_given(frozenset(kwargs))
    return obj
