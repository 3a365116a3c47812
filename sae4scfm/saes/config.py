"""Typed hyperparameters of an SAE architecture: the one source of their defaults and documentation.

Each architecture module defines a frozen dataclass (``TopKConfig`` …) beside its SAE class; every
field is a ``knob(default, doc)``. ``SAEConfig.from_dict`` is the one gate through which
hyperparameters enter (``build_sae``, the class constructors, ``load_sae``): it rejects unknown
keys and wrong types with an ``InputError`` that names the key, the architecture and the valid
keys. The Hydra files ``config/sae/<architecture>.yaml`` are generated from these classes
(``yaml_text``; ``python -m sae4scfm.saes`` rewrites them), and a test fails when a file
drifts from its class, so the YAML holds no second copy of a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from sae4scfm.errors import InputError

YAML_DIR = Path(__file__).resolve().parents[1] / "config" / "sae"


def knob(default: Any, doc: str) -> Any:
    """A dataclass field with its default and its one-line documentation (the YAML comment)."""
    if isinstance(default, list):
        raise TypeError("use a tuple for a sequence default (configs are frozen)")
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class SAEConfig:
    """Hyperparameters every architecture takes. Subclasses add theirs; the class docstring's
    first line heads the generated YAML file."""

    lr: float | None = knob(None, "Adam learning rate; null = 2e-4 / sqrt(d_sae / 2^14) (Gao et al. 2024)")

    @classmethod
    def from_dict(cls, hyperparams: Mapping[str, Any] | None, architecture: str = "", source: str = "") -> SAEConfig:
        """The config of ``hyperparams`` (missing keys take their defaults); ``architecture`` and
        ``source`` (e.g. a cfg.json path) are named in errors. Ints are accepted for floats, lists
        for tuples."""
        hyperparams = dict(hyperparams or {})
        where = f"{source}: " if source else ""
        cls.check_keys(hyperparams, architecture, where)
        hints = typing.get_type_hints(cls)
        values = {k: _coerce(v, hints[k], k, cls, architecture, where) for k, v in hyperparams.items()}
        return cls(**values)

    @classmethod
    def check_keys(cls, keys, architecture: str = "", where: str = "") -> None:
        """InputError for the first of ``keys`` that is not a field, naming the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in keys if k not in names]
        if unknown:
            raise InputError(f"{where}sae.hyperparams.{unknown[0]} is not a hyperparameter of architecture "
                             f"{architecture!r}; valid keys: {', '.join(names)}.")

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), as written to cfg.json and read by Hydra."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, cls: type[SAEConfig], architecture: str, where: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, X | None, tuple[X, ...]), else InputError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key, cls, architecture, where)
            except InputError:
                pass
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_coerce(v, args[0], key, cls, architecture, where) for v in value)
            except InputError:
                pass  # reported below with the whole value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, tp):
        return value
    default = _plain(cls.__dataclass_fields__[key].default)
    raise InputError(f"{where}sae.hyperparams.{key}={value!r} must be {_type_name(tp)} (architecture "
                     f"{architecture!r}, default {_yaml_value(default)}).")


# --- the generated Hydra files --------------------------------------------------------------------

def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return repr(v)


def _line(key_value: str, comment: str) -> str:
    return (key_value.ljust(24) + " " if len(key_value) <= 24 else key_value + "  ") + "# " + comment


def yaml_text(sae_cls: type) -> str:
    """The Hydra config group file ``config/sae/<architecture>.yaml`` of an SAE class: its config's
    defaults, each with its documentation as the comment."""
    cfg = sae_cls.config_class
    module = sae_cls.__module__.replace(".", "/") + ".py"
    lines = [f"# {cfg.__doc__.strip().splitlines()[0]}",
             f"architecture: {sae_cls.architecture}   # SAE class ({module})",
             _line("target_layer: 2", "residual stream after this many blocks (0 = embeddings)"),
             _line("dictionary_multiplier: 4", "d_sae = multiplier x d_model"),
             "hyperparams:"]
    for f in dataclasses.fields(cfg):
        lines.append(_line(f"  {f.name}: {_yaml_value(f.default)}", f.metadata["doc"]))
    return "\n".join(lines) + "\n"


def write_yaml_files(directory: Path = YAML_DIR) -> list[Path]:
    """(Re)write ``config/sae/<architecture>.yaml`` for every registered architecture."""
    from sae4scfm.saes import ARCHITECTURES

    out = []
    for name, cls in ARCHITECTURES.items():
        path = directory / f"{name}.yaml"
        path.write_text(yaml_text(cls))
        out.append(path)
    return out



# --- command-line overrides ---------------------------------------------------------------------

_HP_OVERRIDE = re.compile(r"^(\+\+|\+)?sae\.hyperparams\.([^=.]+)=")
_SAE_CHOICE = re.compile(r"^sae=(.+)$")


def check_sae_overrides(overrides: list[str]) -> None:
    """Reject ``sae.hyperparams.KEY=...`` overrides (plain, ``+`` or ``++``) whose KEY the chosen
    architecture lacks, before Hydra does: Hydra's own message ("Key 'kk' is not in struct")
    names neither the architecture nor the valid keys. The architecture is the last ``sae=``
    override (each of ``sae=a,b`` in a multirun), else train.yaml's default. Other problems are
    left to Hydra."""
    keys = [m.group(2) for m in map(_HP_OVERRIDE.match, overrides) if m]
    if not keys:
        return
    from sae4scfm.saes import sae_class

    choices = [m.group(1) for m in map(_SAE_CHOICE.match, overrides) if m]
    if choices:
        names = choices[-1].split(",")
    else:
        defaults = OmegaConf.load(YAML_DIR.parent / "train.yaml").defaults
        names = [next(d["sae"] for d in defaults if isinstance(d, Mapping) and "sae" in d)]
    for name in names:
        cls = sae_class(name.strip())
        cls.config_class.check_keys(keys, cls.architecture)
