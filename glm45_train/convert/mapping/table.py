"""The declarative HF <-> mcore table (converters/<family>.yaml) instantiated for one model config.

`Glm45Mapping(hf, spec)` expands the table's patterns over layers, experts and the MTP layer into concrete
rules, checks them against the config, and converts one mcore tensor at a time in either direction:

    mapping = Glm45Mapping(hf, spec="local")
    mapping.check_hf_names(reader.names())            # unknown or missing HF tensors -> MappingError
    tensor = mapping.to_mcore("decoder.layers.1.self_attention.linear_qkv.weight", reader.get)
    for hf_name, t in mapping.to_hf(mcore_name, tensor): ...
    for hf_name, runs in mapping.row_runs(mcore_name): ...   # where each HF tensor's rows lie (streaming)

Names are the GPTModel state_dict names at TP=PP=EP=1. Sharding (TP/PP/EP) is not this module's concern.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from glm45_train.convert.mapping import transforms
from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes

CONVERTERS_DIR = Path(__file__).resolve().parents[3] / "converters"
Spec = Literal["te", "local"]


class MappingError(UserError, KeyError):
    """An HF tensor no rule covers, an expected tensor that is missing, or a shape that disagrees."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@dataclass(frozen=True)
class Rule:
    """One mcore tensor and the HF tensors it is made of."""

    mcore: str
    hf: tuple[str, ...]
    transform: str = "identity"


def load_table(family: str = "glm4_moe") -> dict[str, Any]:
    path = CONVERTERS_DIR / f"{family}.yaml"
    if not path.exists():
        raise MappingError(f"no mapping table for model family {family!r} ({path} missing)")
    return yaml.safe_load(path.read_text())


class Glm45Mapping:
    def __init__(self, hf: Glm45Config, spec: Spec = "te", family: str = "glm4_moe") -> None:
        self.hf, self.spec = hf, spec
        table = load_table(family)
        self.rules: dict[str, Rule] = {}
        self.copies: dict[str, str] = {}  # HF copy name -> HF source name
        for entry in table["rules"]:
            for rule in self._expand(entry, table["mtp_inner_prefix"]):
                if rule.mcore in self.rules:
                    raise MappingError(f"{family}.yaml: two rules produce {rule.mcore}")
                self.rules[rule.mcore] = rule
        for entry in table.get("copies", []):
            for m in range(hf.num_nextn_predict_layers):
                self.copies[self._hf_prefix("mtp", m) + entry["hf"]] = entry["source"]
        self.copies_of: dict[str, list[str]] = {}  # HF source name -> its copies
        for copy, original in self.copies.items():
            self.copies_of.setdefault(original, []).append(copy)
        self._shapes = dict(hf_tensor_shapes(hf))
        self._hf_to_rule = {name: rule for rule in self.rules.values() for name in rule.hf}
        self._runs: dict[tuple[str, tuple[int, ...]], list[list[transforms.Run]]] = {}

    # -- expansion of the table ------------------------------------------------------------------------------

    def _layers(self, scope: str) -> Iterator[tuple[str, int]]:
        """(kind, index) pairs a scope covers: ("decoder", L) or ("mtp", M)."""
        k, n, mtp = self.hf.first_k_dense_replace, self.hf.num_hidden_layers, self.hf.num_nextn_predict_layers
        if scope in ("layer", "dense", "moe"):
            first, last = {"layer": (0, n), "dense": (0, k), "moe": (k, n)}[scope]
            yield from (("decoder", layer) for layer in range(first, last))
        if scope in ("layer", "moe", "mtp"):
            yield from (("mtp", m) for m in range(mtp))

    def _hf_prefix(self, kind: str, index: int) -> str:
        return f"model.layers.{index + (self.hf.num_hidden_layers if kind == 'mtp' else 0)}."

    def _expand(self, entry: dict[str, Any], mtp_inner: str) -> Iterator[Rule]:
        when = entry.get("when")
        if when and not getattr(self.hf, when):
            return
        mcore = entry["mcore"] if isinstance(entry["mcore"], str) else entry["mcore"][self.spec]
        hf_names = [entry["hf"]] if isinstance(entry["hf"], str) else list(entry["hf"])
        transform = entry.get("transform", "identity")
        if entry["scope"] == "global":
            yield Rule(mcore, tuple(hf_names), transform)
            return
        experts = range(self.hf.n_routed_experts) if "{E}" in mcore else [None]
        for kind, index in self._layers(entry["scope"]):
            hf_prefix = self._hf_prefix(kind, index)
            if kind == "decoder":
                mcore_prefix = f"decoder.layers.{index}."
            else:
                inner = "" if entry["scope"] == "mtp" else mtp_inner
                mcore_prefix = f"mtp.layers.{index}.{inner}"
            for e in experts:
                fill = {"E": e} if e is not None else {}
                yield Rule(
                    mcore_prefix + mcore.format(**fill),
                    tuple(hf_prefix + name.format(**fill) for name in hf_names),
                    transform,
                )

    # -- checks ----------------------------------------------------------------------------------------------

    def expected_hf_names(self) -> set[str]:
        return set(self._hf_to_rule) | set(self.copies)

    def check_hf_names(self, names: Iterable[str]) -> None:
        names = set(names)
        unknown = sorted(names - self.expected_hf_names())
        missing = sorted(self.expected_hf_names() - names)
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} tensor(s) no rule covers: {_preview(unknown)}")
        if missing:
            problems.append(f"{len(missing)} expected tensor(s) missing: {_preview(missing)}")
        if problems:
            counts = self._count_mismatch(names)
            raise MappingError(
                "checkpoint does not match the glm4_moe config: "
                + "; ".join([*counts, *problems] if counts else problems)
            )

    def _count_mismatch(self, names: set[str]) -> list[str]:
        """The config keys whose counts disagree with the shards (layers, MTP layers, experts), named first: one
        wrong number otherwise shows as dozens of uncovered or missing tensors."""
        layers: dict[int, set[str]] = {}
        for name in names:
            match = re.match(r"model\.layers\.(\d+)\.(.*)", name)
            if match:
                layers.setdefault(int(match[1]), set()).add(match[2])
        mtp = sum(any(rest.startswith("eh_proj.") for rest in parts) for parts in layers.values())
        decoder = len(layers) - mtp
        experts = {int(m[1]) for n in names if (m := re.search(r"\.mlp\.experts\.(\d+)\.", n))}
        hf, found = self.hf, []
        if decoder != hf.num_hidden_layers:
            found.append(f"config.json num_hidden_layers is {hf.num_hidden_layers}, the shards hold {decoder} layers")
        if mtp != hf.num_nextn_predict_layers:
            found.append(
                f"num_nextn_predict_layers is {hf.num_nextn_predict_layers} (1 when config.json leaves it out, as in "
                f"transformers), the shards hold {mtp} MTP layer(s) (layers with eh_proj)"
            )
        if experts and len(experts) != hf.n_routed_experts:
            found.append(f"config.json n_routed_experts is {hf.n_routed_experts}, the shards hold {len(experts)}")
        return found

    def check_shape(self, hf_name: str, tensor: torch.Tensor) -> None:
        expected = self._shapes.get(hf_name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise MappingError(f"tensor {hf_name} has shape {tuple(tensor.shape)}, but config.json implies {expected}")

    # -- conversion ------------------------------------------------------------------------------------------

    def to_mcore(self, mcore_name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        rule = self.rules.get(mcore_name)
        if rule is None:
            raise MappingError(f"no rule produces mcore tensor {mcore_name}")
        parts = []
        for name in rule.hf:
            tensor = read(name)
            self.check_shape(name, tensor)
            parts.append(tensor)
        return self._merge(rule.transform)(*parts)

    def _merge(self, transform: str) -> Callable[..., torch.Tensor]:
        if transform == "qkv":
            return functools.partial(transforms.qkv_merge, num_query_groups=self.hf.num_key_value_heads)
        if transform == "gate_up":
            return transforms.gate_up_merge
        return lambda part: part

    def hf_shape(self, hf_name: str) -> tuple[int, ...]:
        """The shape config.json implies for an HF tensor (copies included)."""
        return self._shapes[hf_name]

    def mcore_shape(self, mcore_name: str) -> tuple[int, ...]:
        """The full (TP=1) shape of an mcore tensor: its HF parts stacked along dim 0."""
        shapes = [self._shapes[name] for name in self._rule(mcore_name).hf]
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def row_runs(self, mcore_name: str) -> list[tuple[str, list[transforms.Run]]]:
        """Each HF part of an mcore tensor with the runs (hf row, mcore row, rows) where its rows lie.

        Enough to read a tensor from HF files straight into its mcore place, or write it back, row range by
        row range (see transforms.row_runs).
        """
        rule = self._rule(mcore_name)
        rows = tuple(self._shapes[name][0] if self._shapes[name] else 1 for name in rule.hf)
        key = (rule.transform, rows)  # the same for every layer (and every expert)
        if key not in self._runs:
            self._runs[key] = transforms.row_runs(self._merge(rule.transform), rows)
        return list(zip(rule.hf, self._runs[key], strict=True))

    def _rule(self, mcore_name: str) -> Rule:
        rule = self.rules.get(mcore_name)
        if rule is None:
            raise MappingError(f"no rule produces mcore tensor {mcore_name}")
        return rule

    def to_hf(self, mcore_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        rule = self.rules.get(mcore_name)
        if rule is None:
            raise MappingError(f"mcore tensor {mcore_name} has no HF counterpart in the glm4_moe table")
        if rule.transform == "qkv":
            hf = self.hf
            parts: tuple[torch.Tensor, ...] = transforms.qkv_split(
                tensor, hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim
            )
        elif rule.transform == "gate_up":
            parts = transforms.gate_up_split(tensor)
        else:
            parts = (tensor,)
        pairs = list(zip(rule.hf, parts, strict=True))
        for name, part in pairs:
            self.check_shape(name, part)
        return pairs

    def copy_mismatch(self, copy_name: str) -> MappingError:
        """The error for an MTP copy that differs from its source."""
        return MappingError(
            f"{copy_name} differs from {self.copies[copy_name]}; "
            "Megatron shares one tensor, so converting would lose the difference"
        )


def _preview(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
