"""Conversion benchmark: our streaming HF <-> Megatron converters against a plain copy and a naive converter.

    .venv/bin/python bench/convert.py [--work /tmp/convert-bench] [--repeats 2] [--naive-experts 16]

Synthetic checkpoints with the real GLM-4.5-Air tensor shapes (vocab 151552, hidden 4096, 96 heads x 128,
128 experts x 1408, dense ffn 10944): embeddings, output head, one dense layer, N MoE layers with all 128
experts and the MTP layer (a full MoE layer plus copies of the embeddings and head), bf16 (fp32 expert bias).

In one run it measures, each in a fresh subprocess (wall time, and peak RSS from `wait4`), with the page cache
of every input dropped first (`posix_fadvise(DONTNEED)` after `sync`, so every run reads from disk):
1. N=2 MoE layers (~19.5 GB): plain copy of the HF files vs our HF->mcore, then plain copy of the mcore
   checkpoint vs our mcore->HF, alternating, best of `--repeats`;
2. N=4 MoE layers (double): our converters again -- peak RSS must not grow;
3. a smaller checkpoint (1 MoE layer with `--naive-experts` experts, no MTP: the naive converter holds
   everything in RAM) for the naive load-everything-then-save converters against ours.
Results go to WORK/results.json and a markdown table on stdout (copied into docs/benchmarks.md).
Needs ~60 GB free disk under WORK (checked first); everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from glm45_train.model.releases import RELEASED_CONFIGS  # noqa: E402  (after the path insert)

AIR = {  # the released Air shapes; the benchmark chooses how many layers
    **{k: v for k, v in RELEASED_CONFIGS["air"].items() if k not in ("num_hidden_layers", "num_nextn_predict_layers")},
    "architectures": ["Glm4MoeForCausalLM"],
    "torch_dtype": "bfloat16",
}
AIR_STOP_IDS = [151329, 151336, 151338]
GiB = 2**30


def air_config(moe_layers: int, experts: int = 128, mtp: bool = True) -> dict:
    return {
        **AIR,
        "num_hidden_layers": 1 + moe_layers,
        "n_routed_experts": experts,
        "num_nextn_predict_layers": int(mtp),
    }


# -- the synthetic checkpoint (model/tiny.py writes it) ------------------------------------------------------


def verify_sample(hf_dir: Path, config: dict, every: int = 97) -> int:
    """Compare every `every`-th tensor of an exported checkpoint with its synthetic source; returns how many."""
    from glm45_train.formats.hf_io import HFCheckpointReader
    from glm45_train.model.hf_config import Glm45Config
    from glm45_train.model.hf_layout import hf_tensor_shapes
    from glm45_train.model.tiny import synthetic_tensor

    reader = HFCheckpointReader(hf_dir)
    shapes = list(hf_tensor_shapes(Glm45Config.from_dict(config)))
    for name, _ in shapes[::every]:
        tensor = reader.get(name)
        if not torch.equal(tensor, synthetic_tensor(name, tuple(tensor.shape), tensor.dtype)):
            raise AssertionError(f"{name} differs from its source after the round trip")
    return len(shapes[::every])


# -- measuring --------------------------------------------------------------------------------------------


def drop_cache(*paths: Path) -> None:
    """Evict the files under `paths` from the page cache (written pages are synced first)."""
    os.sync()
    for root in paths:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)


def measured(args: list[str], inputs: list[Path]) -> dict:
    """Run `bench/convert.py <args>` in a fresh process; wall seconds and that process's peak RSS."""
    drop_cache(*inputs)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{args} failed with status {status}")
    return {"seconds": seconds, "peak_rss_gib": usage.ru_maxrss * 1024 / GiB}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- what each subprocess runs ----------------------------------------------------------------------------


def plain_copy(src: Path, dst: Path) -> None:
    """`cp -r` then `sync`: the page-cache copy (in-kernel `copy_file_range` on Linux)."""
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    os.sync()


def direct_copy(src: Path, dst: Path) -> None:
    """Every file read and written in 16 MiB O_DIRECT blocks: the disk's own copy throughput, no page cache."""
    from glm45_train.formats.direct_io import Appender, aligned_empty, open_file

    block = aligned_empty(16 * 2**20)
    view = block.numpy().data.cast("B")
    for path in sorted(src.rglob("*")):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, _ = open_file(path, os.O_RDONLY)
        out, offset = Appender(target), 0
        while n := os.preadv(fd, [view], offset):
            out.write(view[:n])
            offset += n
        out.close()
        os.close(fd)


def naive_to_mcore(hf_dir: Path, out_dir: Path) -> None:
    """Load every HF tensor, convert all, fill a CPU model, save with Megatron's default torch_dist strategy."""
    from megatron.core import dist_checkpointing

    from glm45_train.convert.mapping.table import Glm45Mapping
    from glm45_train.convert.torch_dist.layout import te_style_sharded_state_dict
    from glm45_train.formats.hf_io import HFCheckpointReader
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import Glm45Config, to_transformer_config
    from glm45_train.runtime import distributed

    hf = Glm45Config.from_file(hf_dir)
    everything = dict(HFCheckpointReader(hf_dir))
    mapping = Glm45Mapping(hf, "local")
    state = {name: mapping.to_mcore(name, everything.__getitem__) for name in mapping.rules}
    distributed.initialize()
    config = to_transformer_config(hf, params_dtype=torch.bfloat16, perform_initialization=False)
    model = build_model(hf, config)
    model.load_state_dict(state, strict=False)
    (out_dir / "release").mkdir(parents=True)
    dist_checkpointing.save(te_style_sharded_state_dict(model, for_save=True), str(out_dir / "release"))


def naive_to_hf(mcore_dir: Path, out_dir: Path) -> None:
    """Load the whole checkpoint into a CPU model, convert every tensor, save shards with safetensors."""
    from safetensors.torch import save_file

    from glm45_train.convert.load import load_mcore
    from glm45_train.convert.mapping.table import Glm45Mapping
    from glm45_train.convert.torch_dist.reader import McoreTensorSource
    from glm45_train.formats.hf_io import plan_shards
    from glm45_train.model.build import build_model
    from glm45_train.model.hf_config import to_transformer_config
    from glm45_train.runtime import distributed

    distributed.initialize()
    hf = McoreTensorSource(mcore_dir).hf
    model = build_model(hf, to_transformer_config(hf, params_dtype=torch.bfloat16, perform_initialization=False))
    load_mcore(model, mcore_dir)
    mapping = Glm45Mapping(hf, "local")
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in mapping.rules:
            tensors.update(mapping.to_hf(name, tensor))
    tensors.update({copy: tensors[source] for copy, source in mapping.copies.items()})
    planned = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    out_dir.mkdir(parents=True)
    for i, shard in enumerate(plan_shards(planned, 5 * GiB), start=1):
        save_file({n: tensors[n].contiguous() for n, _, _ in shard}, str(out_dir / f"model-{i:05d}.safetensors"))


def ours(direction: str, src: Path, dst: Path) -> None:
    from glm45_train.convert.to_hf import mcore_to_hf
    from glm45_train.convert.to_mcore import hf_to_mcore

    convert = hf_to_mcore if direction == "to-mcore" else mcore_to_hf
    print(convert(src, dst).format(), flush=True)


COMMANDS = {
    "copy": plain_copy,
    "direct-copy": direct_copy,
    "naive-to-mcore": naive_to_mcore,
    "naive-to-hf": naive_to_hf,
    "ours-to-mcore": lambda src, dst: ours("to-mcore", src, dst),
    "ours-to-hf": lambda src, dst: ours("to-hf", src, dst),
}


# -- the benchmark ----------------------------------------------------------------------------------------


def alternate(runs: dict[str, list[str]], inputs: list[Path], repeats: int, keep: str = "") -> dict[str, list[dict]]:
    """Each named run `repeats` times, interleaved; outputs (the last argument) are removed after each run, except
    the last output of the run named `keep`."""
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, args in runs.items():
            out = Path(args[-1])
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(measured(args, inputs))
            print(f"  {name}: {results[name][-1]}", flush=True)
            if not (name == keep and repeat == repeats - 1):
                shutil.rmtree(out)
    return results


def best(runs: list[dict], nbytes: int) -> dict:
    fastest = min(runs, key=lambda r: r["seconds"])
    rss = max(r["peak_rss_gib"] for r in runs)
    return {"seconds": fastest["seconds"], "gb_per_s": nbytes / 1e9 / fastest["seconds"], "peak_rss_gib": rss}


def write_synthetic(out_dir: Path, config: dict) -> int:
    from glm45_train.model.tiny import write_synthetic as write

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    write(out_dir, {**config, "eos_token_id": AIR_STOP_IDS})
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": AIR_STOP_IDS}) + "\n")
    return sum(p.stat().st_size for p in out_dir.glob("*.safetensors"))


def round_trip(work: Path, tag: str, config: dict, repeats: int, with_copy: bool) -> dict:
    """Generate, then HF->mcore and mcore->HF; with `with_copy`, each alternates with copies of the HF bytes."""
    hf, mcore, back, copy = (work / f"{tag}-{part}" for part in ("hf", "mcore", "hf-out", "copy"))
    print(f"{tag}: writing the synthetic checkpoint", flush=True)
    hf_bytes = write_synthetic(hf, config)
    to_mcore = {"ours": ["ours-to-mcore", str(hf), str(mcore)]}
    if with_copy:
        to_mcore = {"direct copy": ["direct-copy", str(hf), str(copy)], "cp": ["copy", str(hf), str(copy)], **to_mcore}
    first = alternate(to_mcore, [hf], repeats, keep="ours")
    shutil.rmtree(hf)  # disk: the export's copy baseline copies the export itself (the same bytes)
    second: dict[str, list[dict]] = {"ours": [], **({"direct copy": []} if with_copy else {})}
    for _ in range(repeats):
        shutil.rmtree(back, ignore_errors=True)
        second["ours"].append(measured(["ours-to-hf", str(mcore), str(back)], [mcore]))
        print(f"  ours: {second['ours'][-1]}", flush=True)
        if with_copy:
            second["direct copy"].append(measured(["direct-copy", str(back), str(copy)], [back]))
            print(f"  direct copy: {second['direct copy'][-1]}", flush=True)
            shutil.rmtree(copy)
    checked = verify_sample(back, config)
    mcore_bytes = dir_bytes(mcore)
    for path in (mcore, back):
        shutil.rmtree(path)
    return {
        "hf_bytes": hf_bytes,
        "mcore_bytes": mcore_bytes,
        "verified_tensors": checked,
        "to_mcore": {name: best(runs, hf_bytes) for name, runs in first.items()},
        "to_hf": {name: best(runs, hf_bytes) for name, runs in second.items()},
    }


def naive_comparison(work: Path, experts: int, repeats: int) -> dict:
    config = air_config(1, experts=experts, mtp=False)
    hf, mcore, back = (work / f"naive-{part}" for part in ("hf", "mcore", "hf-out"))
    hf_bytes = write_synthetic(hf, config)
    naive_mcore, naive_back = work / "naive-mcore-naive", work / "naive-hf-naive"
    first = alternate(
        {"naive": ["naive-to-mcore", str(hf), str(naive_mcore)], "ours": ["ours-to-mcore", str(hf), str(mcore)]},
        [hf],
        repeats,
        keep="ours",
    )
    second = alternate(
        {
            "naive": ["naive-to-hf", str(mcore), str(naive_back)],
            "ours": ["ours-to-hf", str(mcore), str(back)],
        },
        [mcore],
        repeats,
    )
    for path in (hf, mcore):
        shutil.rmtree(path, ignore_errors=True)
    return {
        "hf_bytes": hf_bytes,
        "to_mcore": {name: best(runs, hf_bytes) for name, runs in first.items()},
        "to_hf": {name: best(runs, hf_bytes) for name, runs in second.items()},
    }


def _row(label: str, nbytes: int, run: dict, *ratios: str) -> str:
    cells = [label, f"{nbytes / 1e9:.1f} GB", f"{run['seconds']:.1f}", f"{run['gb_per_s']:.3f}"]
    return "| " + " | ".join([*cells, f"{run['peak_rss_gib']:.2f}", *ratios]) + " |"


def report(results: dict) -> str:
    """Throughput is HF checkpoint bytes per second of wall time, for copies and conversions alike."""
    main, double, naive = results["moe2"], results.get("moe4"), results.get("naive")
    lines = [
        "| run | checkpoint | wall s | GB/s | peak RSS GiB | x direct copy | x cp | x naive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    copies = main["to_mcore"]
    lines.append(_row("copy, O_DIRECT (HF checkpoint)", main["hf_bytes"], copies["direct copy"], "1", "", ""))
    lines.append(_row("copy, `cp -r` + sync (HF checkpoint)", main["hf_bytes"], copies["cp"], "", "1", ""))
    for direction, label in (("to_mcore", "HF->mcore"), ("to_hf", "mcore->HF")):
        ours, direct = main[direction]["ours"], main[direction]["direct copy"]
        vs_direct = f"{ours['gb_per_s'] / direct['gb_per_s']:.2f}"
        vs_cp = f"{ours['gb_per_s'] / copies['cp']['gb_per_s']:.2f}"
        if direction == "to_hf":
            lines.append(_row("copy, O_DIRECT (the export)", main["hf_bytes"], direct, "1", "", ""))
        lines.append(_row(f"ours {label}", main["hf_bytes"], ours, vs_direct, vs_cp, ""))
        if double:
            lines.append(
                _row(f"ours {label}, MoE layers doubled", double["hf_bytes"], double[direction]["ours"], "", "", "")
            )
        if naive:
            slow, fast = naive[direction]["naive"], naive[direction]["ours"]
            lines.append(_row(f"naive {label}", naive["hf_bytes"], slow, "", "", "1"))
            speedup = f"{slow['seconds'] / fast['seconds']:.2f}"
            lines.append(_row(f"ours {label} (naive's checkpoint)", naive["hf_bytes"], fast, "", "", speedup))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert-bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--naive-experts", type=int, default=64)
    parser.add_argument("--moe-layers", type=int, default=2, help="MoE layers of the main checkpoint (doubled next)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["double", "naive"])
    args = parser.parse_args()
    free = shutil.disk_usage(args.work.parent).free
    if free < 60 * 10**9:
        sys.exit(f"{args.work.parent}: {free / 1e9:.0f} GB free, the benchmark needs 60 GB")
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    results = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "load_before": os.getloadavg()}}
    try:
        results["moe2"] = round_trip(args.work, "moe2", air_config(args.moe_layers), args.repeats, with_copy=True)
        if "double" not in args.skip:
            results["moe4"] = round_trip(args.work, "moe4", air_config(2 * args.moe_layers), 1, with_copy=False)
        if "naive" not in args.skip:
            results["naive"] = naive_comparison(args.work, args.naive_experts, args.repeats)
    finally:
        results["machine"]["load_after"] = os.getloadavg()
        (args.work.parent / "convert-bench-results.json").write_text(json.dumps(results, indent=2) + "\n")
        shutil.rmtree(args.work, ignore_errors=True)
    print(report(results))
    print(f"load average (1/5/15 min): before {results['machine']['load_before']}, after {os.getloadavg()}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] in COMMANDS:
        COMMANDS[sys.argv[1]](Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
