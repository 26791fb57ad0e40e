"""FP8 checkpoints (GLM-4.5-FP8, GLM-4.5-Air-FP8): `quantization_config` read, weights dequantised to bf16 as read.

Two schemes, named as in `make-tiny --fp8`:
- `per-channel`: compressed-tensors (`quant_method: compressed-tensors`, float 8-bit weights, strategy `channel`
  or `tensor`): `X.weight` F8_E4M3 [out, in] with `X.weight_scale` [out, 1] (or one value); w = fp8 * scale.
- `block`: DeepSeek-style (`quant_method: fp8`, `weight_block_size: [128, 128]`): `X.weight` F8_E4M3 with
  `X.weight_scale_inv` fp32 [ceil(out/128), ceil(in/128)]; w = fp8 * scale_inv of the element's 128x128 block
  (despite its name the factor multiplies, as in DeepSeek's reference `weight_dequant`).
The product is taken in fp32 and rounded once to bf16. Anything else (other methods, bit widths, strategies,
static activation scales) is refused by name: guessing would silently corrupt weights.

`DequantisingReader` wraps an `HFCheckpointReader` and looks like the bf16 checkpoint it was quantised from:
scale tensors vanish from the names, FP8 weights report BF16, `read_into` dequantises only the rows asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glm45_train.errors import UserError
from glm45_train.formats.hf_io import CheckpointError, HFCheckpointReader, TensorReader

FP8 = "F8_E4M3"
_ROWS_PER_STEP = 16 * 2**20  # elements dequantised at once (bounds the fp32 temporary to 64 MiB)


class QuantizationError(UserError, ValueError):
    """A quantization_config this converter does not dequantise, or FP8 tensors that do not fit it."""


@dataclass(frozen=True)
class Fp8Scheme:
    name: str  # "per-channel" | "block"
    scale_suffix: str  # "weight_scale" | "weight_scale_inv"
    block: tuple[int, int] | None = None

    def scale_shape(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The scale shapes accepted for a weight of `shape`."""
        if self.block is None:
            return [(shape[0], 1), (shape[0],), (1,), ()]
        return [(math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1]))]


PER_CHANNEL = Fp8Scheme("per-channel", "weight_scale")
BLOCK = Fp8Scheme("block", "weight_scale_inv", (128, 128))
SCHEMES = {scheme.name: scheme for scheme in (PER_CHANNEL, BLOCK)}


def scheme_of(config: dict[str, Any], source: str = "config.json") -> Fp8Scheme | None:
    """The FP8 scheme config.json declares, None for an unquantised checkpoint; refuses anything else."""
    quant = config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method == "fp8":
        return _block_scheme(quant, source)
    if method == "compressed-tensors":
        return _compressed_tensors_scheme(quant, source)
    raise QuantizationError(
        f"{source}: quantization_config.quant_method {method!r} is not supported; supported: "
        "compressed-tensors FP8 per-channel (GLM-4.5-FP8) and fp8 with 128x128 blocks"
    )


def _block_scheme(quant: dict[str, Any], source: str) -> Fp8Scheme:
    where = f"{source}: quantization_config (fp8)"
    if quant.get("fmt", "e4m3") != "e4m3":
        raise QuantizationError(f"{where}: fmt {quant['fmt']!r} is not supported (only e4m3)")
    if list(quant.get("weight_block_size") or []) != [128, 128]:
        raise QuantizationError(f"{where}: weight_block_size {quant.get('weight_block_size')} is not [128, 128]")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantizationError(f"{where}: activation_scheme {quant['activation_scheme']!r} (only dynamic)")
    return BLOCK


def _compressed_tensors_scheme(quant: dict[str, Any], source: str) -> Fp8Scheme:
    where = f"{source}: quantization_config (compressed-tensors)"
    if quant.get("format") != "float-quantized":
        raise QuantizationError(f"{where}: format {quant.get('format')!r} is not supported (only float-quantized)")
    groups = quant.get("config_groups") or {}
    if not groups:
        raise QuantizationError(f"{where}: no config_groups")
    for group_name, group in groups.items():
        weights = group.get("weights") or {}
        found = (weights.get("type"), weights.get("num_bits"), weights.get("strategy"))
        if found[:2] != ("float", 8) or found[2] not in ("channel", "tensor"):
            raise QuantizationError(
                f"{where}: {group_name} weights are {found[0]} {found[1]}-bit with strategy {found[2]!r}; "
                "only float 8-bit per channel or per tensor is supported"
            )
        activations = group.get("input_activations")
        if activations and not activations.get("dynamic"):
            raise QuantizationError(f"{where}: {group_name} has static input activation scales (not supported)")
    return PER_CHANNEL


def dequantize(fp8: torch.Tensor, scale: torch.Tensor, scheme: Fp8Scheme, row: int = 0) -> torch.Tensor:
    """bf16 values of rows [row, row + len(fp8)) of an FP8 weight, given the weight's whole scale tensor."""
    values = fp8.to(torch.float32)
    factor = scale.to(torch.float32)
    if scheme.block is None:
        factor = factor.reshape(-1, 1)
        if factor.shape[0] > 1:
            factor = factor[row : row + fp8.shape[0]]
    else:
        rows_per_block, cols_per_block = scheme.block
        first, last = row // rows_per_block, (row + fp8.shape[0] - 1) // rows_per_block
        factor = factor[first : last + 1].repeat_interleave(rows_per_block, 0)
        skip = row - first * rows_per_block
        factor = factor[skip : skip + fp8.shape[0]].repeat_interleave(cols_per_block, 1)[:, : fp8.shape[1]]
    return (values * factor).to(torch.bfloat16)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize(weight: torch.Tensor, scheme: Fp8Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale) such that `dequantize` gives back `weight` within FP8 rounding (make-tiny --fp8).

    Per-channel scales are stored in bf16 (as compressed-tensors stores them), block scales in fp32 (DeepSeek).
    """
    values = weight.to(torch.float32)
    if scheme.block is None:
        scale = (values.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12).to(torch.bfloat16)
        factor = scale.to(torch.float32)
    else:
        rows, cols = scheme.block
        padded = torch.nn.functional.pad(values, (0, -values.shape[1] % cols, 0, -values.shape[0] % rows))
        blocks = padded.unflatten(0, (-1, rows)).unflatten(2, (-1, cols))  # [R, rows, C, cols]
        scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
        factor = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[: values.shape[0], : values.shape[1]]
    fp8 = (values / factor).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return fp8, scale


def quantization_config(scheme: Fp8Scheme, unquantized_linears: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` as the releases of each kind write it."""
    if scheme.block is not None:
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    float8 = {"type": "float", "num_bits": 8, "symmetric": True}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**float8, "strategy": "channel", "dynamic": False, "observer": "minmax"},
                "input_activations": {**float8, "strategy": "token", "dynamic": True, "observer": None},
                "output_activations": None,
            }
        },
        "ignore": unquantized_linears,
        "kv_cache_scheme": None,
    }


class DequantisingReader:
    """An `HFCheckpointReader` over an FP8 checkpoint that reads like the bf16 checkpoint (see module doc)."""

    def __init__(self, reader: HFCheckpointReader, scheme: Fp8Scheme) -> None:
        self.raw, self.scheme, self.directory = reader, scheme, reader.directory
        suffix = "." + scheme.scale_suffix
        scales = [name for name in reader.names() if name.endswith(suffix)]
        self.scale_of = {name[: -len(suffix)] + ".weight": name for name in scales}
        hidden = set(scales)
        self.weight_map = {name: f for name, f in reader.weight_map.items() if name not in hidden}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def tensor_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shapes and (dequantised) dtypes; checks every FP8 weight has a scale of the right shape and vice versa."""
        specs = self.raw.tensor_specs()
        for weight, scale in self.scale_of.items():
            if weight not in specs or specs[weight][1] != FP8:
                raise QuantizationError(f"{self.directory}: {scale} scales no FP8 tensor {weight}")
        out = {}
        for name in self.weight_map:
            shape, dtype = specs[name]
            if dtype == FP8:
                self._check_scale(name, shape, specs)
                dtype = "BF16"
            out[name] = (shape, dtype)
        return out

    def _check_scale(self, name: str, shape: tuple[int, ...], specs: dict) -> None:
        scale = self.scale_of.get(name)
        if scale is None:
            raise QuantizationError(f"{self.directory}: FP8 tensor {name} has no {self.scheme.scale_suffix}")
        if len(shape) != 2 or tuple(specs[scale][0]) not in self.scheme.scale_shape(shape):
            raise QuantizationError(
                f"{self.directory}: {scale} has shape {list(specs[scale][0])}, which is not a {self.scheme.name} "
                f"scale for {name} {list(shape)}"
            )

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        shape, dtype = self.raw.shape_and_dtype(name)
        return shape, "BF16" if dtype == FP8 else dtype

    def read_into(self, name: str, out: torch.Tensor, row: int = 0) -> None:
        scale_name = self.scale_of.get(name)
        if scale_name is None:
            self.raw.read_into(name, out, row)
            return
        scale = self.raw.get(scale_name)
        cols = max(1, math.prod(out.shape[1:]))
        step = max(1, _ROWS_PER_STEP // cols)
        for start in range(0, out.shape[0], step):
            rows = out[start : start + step]
            fp8 = torch.empty(rows.shape, dtype=torch.float8_e4m3fn)
            self.raw.read_into(name, fp8, row + start)
            rows.copy_(dequantize(fp8, scale, self.scheme, row + start))

    def torch_dtype(self, name: str) -> torch.dtype:
        return torch.bfloat16 if name in self.scale_of else self.raw.entry(name).torch_dtype

    def get(self, name: str) -> torch.Tensor:
        out = torch.empty(self.shape_and_dtype(name)[0], dtype=self.torch_dtype(name))
        self.read_into(name, out)
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_map:
            yield name, self.get(name)


def open_hf_reader(hf_dir: str | Path) -> TensorReader:
    """The checkpoint's reader: dequantising when config.json declares an FP8 scheme."""
    reader = HFCheckpointReader(hf_dir)
    config_path = Path(hf_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return reader  # Glm45Config.from_file reports the problem with config.json
    scheme = scheme_of(config, str(config_path))
    if scheme is None:
        if any(dtype == FP8 for _, dtype in reader.tensor_specs().values()):
            raise CheckpointError(f"{hf_dir}: FP8 tensors but no quantization_config in config.json")
        return reader
    return DequantisingReader(reader, scheme)
