"""The README's main job on the embedded default: a tiny GLM-4.5 generated locally, end to end.

Today: make-tiny -> precision check of our Megatron model against transformers -> one forward/backward
(with the MTP loss). Each step is a `glm45-train` command or one library call; the pipeline grows with the
project (convert -> LoRA SFT -> export -> chat).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from glm45_train.cli.main import main as glm45_train


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*argv: str) -> None:
    print("$ glm45-train " + " ".join(argv), flush=True)
    code = glm45_train(list(argv))
    if code:
        sys.exit(f"demo: 'glm45-train {' '.join(argv)}' failed with exit code {code}")


def forward_backward(hf_dir: Path) -> None:
    import torch

    from glm45_train.convert.tensor_source import HFTensorSource, load_weights
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed

    distributed.initialize()
    source = HFTensorSource(hf_dir)
    model = build_model(source.hf, to_transformer_config(source.hf, mtp_loss_scaling_factor=0.3))
    load_weights(model, source)
    tokens = torch.randint(0, source.hf.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(64).expand(2, 64), None, labels=tokens).mean()
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters()))
    print(f"loss {loss.item():.4f}  grad norm {grad_norm.item():.4f}  (MTP loss included)")


def demo(work_dir: Path) -> None:
    started = time.time()
    hf_dir = work_dir / "tiny-air-hf"
    step("1. make a tiny GLM-4.5-Air checkpoint (released format, local tokenizer)")
    run("make-tiny", str(hf_dir), "--preset", "air", "--overwrite")
    step("2. precision check: Megatron-Core model vs transformers' Glm4MoeForCausalLM (fp32)")
    run("check", str(hf_dir), str(hf_dir))
    step("3. forward + backward on Megatron-Core")
    forward_backward(hf_dir)
    print(f"\ndemo finished in {time.time() - started:.0f} s; files in {work_dir}")


if __name__ == "__main__":
    demo(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
