"""What a run directory records besides checkpoints, so that it is self-describing for `export --to-hf`:
the resolved recipe (`recipe.yaml`) and, in the converter's format (`glm45_train.json` + `hf_assets/`), the source
model's config and tokenizer files — the same metadata `export --to-mcore` writes beside a converted checkpoint.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from glm45_train.config.recipe import Recipe
from glm45_train.convert.torch_dist.directory import ASSETS_DIR, McoreCheckpointDir, copy_assets, write_metadata
from glm45_train.train.run_lock import claim_run_dir


def write_run_metadata(recipe: Recipe, run_dir: Path) -> None:
    """Called by the first rank before training (again on resume: the files are rewritten identically), holding
    the directory's lock (train/run_lock.py)."""
    from omegaconf import OmegaConf

    claim_run_dir(run_dir)
    (run_dir / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(recipe)))
    source = Path(recipe.model.source)
    if (source / "config.json").exists():
        metadata = {
            "source": {
                "path": str(source.resolve()),
                "config": json.loads((source / "config.json").read_text()),
                "files": copy_assets(source, run_dir / ASSETS_DIR),
            },
        }
    else:
        checkpoint = McoreCheckpointDir(source)
        metadata = {k: v for k, v in checkpoint.metadata.items() if k != "format"}
        shutil.copytree(checkpoint.assets, run_dir / ASSETS_DIR, dirs_exist_ok=True)
    metadata["conversion"] = {
        "dtype": recipe.model.dtype,
        "layout": asdict(recipe.parallel),
        "keys": "transformer_engine",
    }
    metadata["training"] = {
        "kind": "lora" if recipe.lora.enabled else "full",
        "base": str(source.resolve()),
        "mtp_trained": recipe.train.mtp_loss_weight > 0,  # else no MTP tensors are saved: export takes the base's
    }
    write_metadata(run_dir, metadata)
