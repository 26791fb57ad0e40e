"""Read the adapters of a LoRA run (adapter-only torch_dist checkpoint, written at any layout) in one process.

The model is built on the `meta` device with the run's adapters attached; only the adapter tensors are
materialised and loaded, so reading a GLM-4.5 (355B) run's adapters needs memory for the adapters alone. Read
through torch_dist/safe_load.py (a run directory from elsewhere runs no code from its pickles).
Names in the result are the TP=1/EP=1 local-spec names of `lora_state_dict` (see state.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glm45_train.config.recipe import LoraSection, Recipe, load_recipe, mtp_layers
from glm45_train.convert.torch_dist import safe_load
from glm45_train.convert.torch_dist.directory import McoreCheckpointDir
from glm45_train.errors import UserError
from glm45_train.lora.apply import apply_lora
from glm45_train.lora.state import lora_sharded_state_dict
from glm45_train.model.hf_config import Glm45Config, to_transformer_config


@dataclass
class LoraRun:
    """A finished (or checkpointed) LoRA run: where it came from and what it learned."""

    directory: McoreCheckpointDir
    recipe: Recipe
    hf: Glm45Config
    base: Path  # the model the adapters were trained on (HF dir or converted mcore dir)
    state: dict[str, torch.Tensor]

    @property
    def lora(self) -> LoraSection:
        return self.recipe.lora

    @property
    def scaling(self) -> float:
        return self.lora.alpha / self.lora.rank


def is_lora_run(path: str | Path) -> bool:
    directory = McoreCheckpointDir(path)
    return directory.metadata.get("training", {}).get("kind") == "lora"


def read_lora_run(path: str | Path) -> LoraRun:
    """The adapters of the run's latest checkpoint (or of the iteration directory given)."""
    from glm45_train.model.build import build_model
    from glm45_train.runtime import distributed

    directory = McoreCheckpointDir(path)
    training = directory.metadata.get("training", {})
    if training.get("kind") != "lora":
        raise UserError(
            f"{directory.root}: not a LoRA run (glm45_train.json has training.kind = {training.get('kind')!r})"
        )
    recipe = load_recipe(directory.root / "recipe.yaml")
    hf = Glm45Config.from_dict(directory.hf_config, source=str(directory.root / "glm45_train.json"))
    distributed.initialize()
    config = to_transformer_config(hf, perform_initialization=False, mtp_num_layers=mtp_layers(recipe, hf))
    model = build_model(hf, config, device="meta")  # as trained: without the MTP block when it was not trained
    apply_lora(model, recipe.lora, seed=recipe.train.seed)
    _materialise_adapters(model)
    loaded = safe_load.load(lora_sharded_state_dict(model), directory.checkpoint)
    state = {name: tensor for name, tensor in loaded.items() if isinstance(tensor, torch.Tensor)}
    if not state:
        raise UserError(f"{directory.checkpoint}: holds no adapter tensors")
    return LoraRun(directory, recipe, hf, Path(training["base"]), state)


def _materialise_adapters(model: torch.nn.Module) -> None:
    """Give the (meta) adapter parameters CPU storage to load into, keeping Megatron's attributes on them."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None or not name.startswith("lora_"):
                continue
            real = torch.nn.Parameter(torch.zeros(param.shape, dtype=param.dtype), requires_grad=False)
            real.__dict__.update(param.__dict__)
            module._parameters[name] = real
