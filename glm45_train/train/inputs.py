"""Raw recipe inputs (`data.inputs`) -> a prepared dataset inside the run directory, once, before training.

The first rank prepares (with the tokenizer stored beside the model unless `data.tokenizer` says otherwise);
the others wait for the finished directory. A dataset already prepared there from the same inputs and options
is reused, so a resumed run reads exactly the same rows.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

from glm45_train.config.recipe import Recipe
from glm45_train.errors import UserError


def tokenizer_dir_for(recipe: Recipe) -> Path:
    if recipe.data.tokenizer:
        return Path(recipe.data.tokenizer)
    source = Path(recipe.model.source)
    for candidate in (source, source / "hf_assets"):
        if (candidate / "tokenizer.json").exists() or (candidate / "tokenizer_config.json").exists():
            return candidate
    raise UserError(f"key 'data.tokenizer': no tokenizer found beside {source}; set data.tokenizer")


def ensure_prepared(recipe: Recipe) -> Recipe:
    """The recipe with `data.prepared` pointing at a prepared dataset (preparing raw inputs if needed)."""
    if recipe.data.prepared:
        return recipe
    from glm45_train.data.chat import parse_mode
    from glm45_train.data.prepare import PrepareOptions, prepare_dataset
    from glm45_train.train.run_lock import claim_run_dir

    target = Path(recipe.checkpoint.dir) / "data"
    request = {
        "inputs": [str(Path(i).resolve()) for i in recipe.data.inputs],
        "mode": recipe.data.mode,
        "max_length": recipe.data.max_length,
        "pack": recipe.data.pack,
        "seed": recipe.train.seed,
    }
    request_file = Path(recipe.checkpoint.dir) / "data_request.json"
    if int(os.environ.get("RANK", "0")) == 0:
        claim_run_dir(recipe.checkpoint.dir)  # before the data folder is touched: one run per directory
    if int(os.environ.get("RANK", "0")) == 0 and not _already_prepared(target, request_file, request):
        options = PrepareOptions(
            max_length=recipe.data.max_length,
            mode=parse_mode(recipe.data.mode),
            pack=recipe.data.pack,
            seed=recipe.train.seed,
            overwrite=True,  # the run's own data folder, re-prepared because the recipe's data request changed
        )
        prepare_dataset(recipe.data.inputs, tokenizer_dir_for(recipe), target, options)
        request_file.write_text(json.dumps(request, indent=2) + "\n")
    _wait_for(request_file)
    return replace(recipe, data=replace(recipe.data, prepared=str(target), inputs=[]))


def _already_prepared(target: Path, request_file: Path, request: dict) -> bool:
    return target.is_dir() and request_file.exists() and json.loads(request_file.read_text()) == request


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for rank 0 to prepare the data ({path})")
        time.sleep(0.5)
