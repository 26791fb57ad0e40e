"""What every engine built from an export directory shares: its start-up directory and the check of a weight update.

Notable:
- Engines start from a directory holding config.json, generation_config.json and the tokenizer and template
  files but no weights (SGLang `load_format="dummy"`, vLLM likewise): the weights come from the first
  `update_weights`, so no engine ever reads a stale checkpoint.
- `WeightCheck`: SGLang skips a name it does not know without a word, and vLLM's reload only logs one; every
  name and shape of an update is checked here against the released checkpoint's tensor list (model/hf_layout.py),
  once each, and a missing tensor fails after the last: an update that drops the routed experts (a failure users
  of other frameworks report) is refused by name before the engine serves from it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glm45_train.convert.torch_dist.directory import carried_files
from glm45_train.errors import UserError
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes

ARCHITECTURE = "Glm4MoeForCausalLM"  # the model class SGLang and vLLM pick for model_type glm4_moe


def prepare_model_dir(assets_dir: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` holding what an engine reads at start from `assets_dir` (an HF checkpoint, or a converted one's
    hf_assets/): config.json, generation_config.json, tokenizer and template files; no weights. Written under a
    staging name and renamed, so the engines of one node preparing the same directory do not collide."""
    assets, out = Path(assets_dir), Path(out_dir)
    config = assets / "config.json"
    if not config.is_file():
        raise UserError(f"{assets}: no config.json (the engine's model directory needs one)")
    architectures = json.loads(config.read_text()).get("architectures") or []
    if ARCHITECTURE not in architectures:
        raise UserError(f"{config}: architectures {architectures} lack {ARCHITECTURE} (engines pick their model by it)")
    if (out / "config.json").is_file():
        if (out / "config.json").read_bytes() != config.read_bytes():
            raise UserError(f"{out}: prepared for another model (its config.json differs from {config}); remove it")
        return out
    staging = out.with_name(f".{out.name}.partial.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in carried_files(assets):
        shutil.copy2(path, staging / path.name)
    try:
        staging.rename(out)
    except OSError:  # another engine of this node finished first, with the same files
        shutil.rmtree(staging, ignore_errors=True)
    return out


class WeightCheck:
    """The tensors an engine's Glm4MoeForCausalLM loads: each name known, of its shape, once; none missing."""

    def __init__(self, hf: Glm45Config) -> None:
        self.hf = hf
        self.expected = {name: shape for name, shape in hf_tensor_shapes(hf) if not self.is_mtp(name)}
        self.seen: set[str] = set()

    def is_mtp(self, name: str) -> bool:
        """The MTP layer's tensors, which the engines' main model skips (a draft model would read them)."""
        return name.startswith("model.layers.") and int(name.split(".")[2]) >= self.hf.num_hidden_layers

    def take(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.expected:
            raise ValueError(f"weight update: {name!r} is not a tensor of the checkpoint (the engine would skip it)")
        if name in self.seen:
            raise ValueError(f"weight update: {name!r} sent twice")
        if shape != self.expected[name]:
            raise ValueError(f"weight update: {name!r} has shape {list(shape)}, expected {list(self.expected[name])}")
        self.seen.add(name)

    def finish(self) -> None:
        missing = sorted(self.expected.keys() - self.seen)
        if missing:
            raise ValueError(f"weight update: {len(missing)} tensor(s) missing, e.g. {missing[:3]}")
