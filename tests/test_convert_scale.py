"""Conversion at full scale. The mapping at full size, on `meta`: every tensor of the real GLM-4.5 and
GLM-4.5-Air checkpoints (MTP layer included), derived from their released configs, converts in both directions;
at parallel layouts every rank writes chunks that name a mapped tensor and fit its full shape, the ranks' chunks
tile every checkpoint tensor exactly once, and what any rank of any layout would load is exactly what was
written. Nothing is allocated. Then the streaming machinery that keeps full-size conversions in bounded memory:
the planned safetensors writer, DCP records, row placement, error propagation between reader and writers.
(Throughput and peak RSS are measured by bench/convert.py, not here.)
"""

from __future__ import annotations

import bisect
import functools
import io
import math
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from glm45_train.convert.mapping import transforms
from glm45_train.convert.mapping.table import Glm45Mapping
from glm45_train.formats.buffers import ByteBudget, Workers
from glm45_train.formats.dcp_records import _plain_tensor_spec, crc32_off, read_record_into, write_record
from glm45_train.formats.direct_io import Appender, read_into
from glm45_train.formats.hf_io import CheckpointError, HFCheckpointReader, StreamingHFWriter
from glm45_train.model.hf_config import Glm45Config
from glm45_train.model.hf_layout import hf_tensor_shapes
from tests.conftest import REPO_ROOT
from tests.test_build import GLM45_RELEASE
from tests.test_hf_config import AIR_RELEASE

RELEASES = {"air": AIR_RELEASE, "glm45": GLM45_RELEASE}
# MODEL:TP:PP:EP:WORLD -- TP+EP for each model at full width, and pipeline stages (MTP on the last one).
LAYOUTS = ["air:2:1:4:8", "glm45:4:1:8:8", "air:1:2:2:4"]


@pytest.mark.parametrize("model", ["air", "glm45"])
def test_every_released_tensor_converts_both_ways(model):
    hf = Glm45Config.from_dict(RELEASES[model])
    shapes = dict(hf_tensor_shapes(hf))
    mtp = f"model.layers.{hf.num_hidden_layers}."
    assert f"{mtp}eh_proj.weight" in shapes and f"{mtp}mlp.experts.{hf.n_routed_experts - 1}.down_proj.weight" in shapes
    mapping = Glm45Mapping(hf, "local")
    mapping.check_hf_names(shapes)  # no tensor unmapped, none expected but absent
    produced, checked = [], {}
    for name, rule in mapping.rules.items():
        parts = tuple(shapes[n] for n in rule.hf)
        signature = (rule.transform, parts)  # the same for every layer and expert: transform it once, on meta
        if signature not in checked:
            merged = mapping.to_mcore(name, lambda n: torch.empty(shapes[n], dtype=torch.bfloat16, device="meta"))
            back = [tuple(t.shape) for _, t in mapping.to_hf(name, merged)]
            assert back == list(parts), name
            runs = sorted((row, n) for _, part_runs in mapping.row_runs(name) for _, row, n in part_runs)
            ends = [0] + [start + n for start, n in runs]
            assert [start for start, _ in runs] == ends[:-1] and ends[-1] == merged.shape[0], name  # a partition
            checked[signature] = tuple(merged.shape)
        assert mapping.mcore_shape(name) == checked[signature], name
        produced += rule.hf
    produced += [copy for copy, source in mapping.copies.items() if source in produced]
    assert sorted(produced) == sorted(shapes)  # each HF tensor exactly once, MTP copies included
    elements = sum(math.prod(s) for n, s in shapes.items() if n not in mapping.copies)
    assert elements == sum(math.prod(mapping.mcore_shape(name)) for name in mapping.rules)


@pytest.fixture(scope="module")
def layout_reports(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("layouts") / "reports.pkl"
    script = REPO_ROOT / "tests" / "dist" / "convert_layouts.py"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(out), *LAYOUTS], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return pickle.loads(Path(out).read_bytes())


def tiles(global_shape: tuple[int, ...], regions: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether the (offset, size) boxes cover `global_shape` exactly once (counted on the grid of their edges)."""
    cuts = [
        sorted({0, n, *(o[d] for o, _ in regions), *(o[d] + s[d] for o, s in regions)})
        for d, n in enumerate(global_shape)
    ]
    if any(c[0] < 0 or c[-1] > n for c, n in zip(cuts, global_shape, strict=True)):
        return False
    count = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
    for offset, size in regions:
        box = tuple(
            slice(bisect.bisect_left(c, o), bisect.bisect_left(c, o + s))
            for c, o, s in zip(cuts, offset, size, strict=True)
        )
        count[box] += 1
    return bool((count == 1).all())


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_rank_writes_mapped_chunks_that_tile_the_checkpoint(layout_reports, layout):
    model = layout.split(":")[0]
    mapping = Glm45Mapping(Glm45Config.from_dict(RELEASES[model]), "local")
    reports = layout_reports[layout]
    assert set().union(*(r["names"] for r in reports)) == set(mapping.rules)  # every rule, every expert, on some rank
    shapes: dict[str, tuple[int, ...]] = {}
    written: dict[str, list] = {}
    for report in reports:
        for key, global_shape, offset, size, main in report["chunks"]:
            assert shapes.setdefault(key, global_shape) == global_shape, key
            if main:
                written.setdefault(key, []).append((offset, size))
    assert set(written) == set(shapes)  # every tensor some rank loads is written by some rank
    untiled = [key for key, regions in written.items() if not tiles(shapes[key], regions)]
    assert untiled == []


@pytest.mark.slow
def test_the_checkpoint_format_does_not_depend_on_the_layout(layout_reports):
    """Keys and global shapes are the same whichever layout wrote them (so any layout loads any other's)."""
    formats: dict[str, dict] = {}
    for layout, reports in layout_reports.items():
        keys = {key: shape for r in reports for key, shape, *_ in r["chunks"]}
        formats.setdefault(layout.split(":")[0], keys)
        assert keys == formats[layout.split(":")[0]], layout


def test_tiling_check_sees_gaps_and_overlaps():
    halves = [((0, 0), (2, 4)), ((2, 0), (2, 4))]
    assert tiles((4, 4), halves)
    assert not tiles((4, 4), halves[:1])  # gap
    assert not tiles((4, 4), [*halves, ((1, 0), (1, 4))])  # overlap
    assert not tiles((4, 4), [((0, 0), (2, 4)), ((2, 0), (3, 4))])  # outside


# -- the streaming machinery the full-size conversions rely on -----------------------------------------------


def test_streaming_hf_writer_accepts_rows_in_any_order_from_threads(tmp_path):
    tensors = {
        "a": torch.randn(300, 8).to(torch.bfloat16),
        "b": torch.randn(5, dtype=torch.float32),
        "c": torch.randn(7, 3, 2).to(torch.bfloat16),
    }
    planned = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingHFWriter(tmp_path / "out", planned, max_shard_bytes=3000)
    pieces = [("c", 0, 7), ("a", 100, 300), ("b", 0, 5), ("a", 0, 100)]
    threads = [threading.Thread(target=writer.write, args=(n, tensors[n][lo:hi], lo)) for n, lo, hi in pieces]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with pytest.raises(CheckpointError, match="written twice"):
        writer.write("b", tensors["b"])
    assert len(writer.finish()) == 2  # "a" alone exceeds the shard size
    for shard in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:  # the reference reader accepts our files
            for name in handle.keys():  # noqa: SIM118
                assert torch.equal(handle.get_tensor(name), tensors[name]), name


def test_sequential_hf_writer_appends_in_plan_order_only(tmp_path):
    tensors = {"a": torch.randn(10, 4), "b": torch.randn(3).to(torch.bfloat16), "c": torch.randn(2, 2)}
    planned = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    writer = StreamingHFWriter(tmp_path / "out", planned, max_shard_bytes=100, sequential=True)
    writer.append("a", tensors["a"][:4])
    with pytest.raises(CheckpointError, match="out of the planned order"):
        writer.append("b", tensors["b"])  # "a" is not complete yet
    writer.append("a", tensors["a"][4:])
    writer.append("b", tensors["b"])
    writer.append("c", tensors["c"])
    writer.finish()
    reader = HFCheckpointReader(tmp_path / "out")
    assert all(torch.equal(reader.get(name), t) for name, t in tensors.items())


def test_streaming_hf_writer_refuses_to_finish_with_missing_rows(tmp_path):
    writer = StreamingHFWriter(tmp_path / "out", [("a", (4, 2), torch.float32)])
    writer.write("a", torch.zeros(2, 2), row=0)
    with pytest.raises(CheckpointError, match="never written"):
        writer.finish()
    writer.close()
    assert not list((tmp_path / "out").glob("model*"))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(64, 48).to(torch.bfloat16)[8:40],  # a view into a larger storage
        torch.arange(12.0).view(3, 4).t(),  # not contiguous
        torch.tensor(3.5),
        torch.ones(5).to(torch.float8_e4m3fn),  # pickled differently: read through torch.load
    ],
)
def test_dcp_records_read_back_exactly(tmp_path, tensor):
    path = tmp_path / "r.distcp"
    stream = Appender(path)
    with crc32_off():
        stream.write(b"x" * 13)  # records start anywhere in a .distcp file
        offset, length = write_record(stream, tensor)
    stream.close()
    raw = path.read_bytes()[offset : offset + length]
    assert torch.equal(as_bytes(torch.load(io.BytesIO(raw), weights_only=True)), as_bytes(tensor))
    out = torch.empty(tensor.shape, dtype=tensor.dtype)
    if tensor.dtype == torch.bfloat16:
        fd = os.open(path, os.O_RDONLY)
        assert _plain_tensor_spec(fd, offset, length) is not None  # the fast path applies
        os.close(fd)
    read_record_into(path, offset, length, out)
    assert torch.equal(as_bytes(out), as_bytes(tensor))
    assert length < tensor.numel() * tensor.element_size() + 2048  # the view's bytes only, not its storage


@pytest.mark.parametrize("direct", [True, False])  # O_DIRECT, and the buffered fallback (tmpfs and friends)
def test_direct_io_reads_and_appends_any_byte_range(tmp_path, direct):
    data = torch.randint(0, 256, (3 * 2**20 + 12345,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    appender = Appender(tmp_path / "f", direct=direct, block=64 * 1024)
    appender.write(data[:100].numpy().tobytes())  # bytes, then a tensor spanning many blocks
    appender.write(data[100:])
    assert appender.tell() == data.numel()
    appender.close()
    assert (tmp_path / "f").read_bytes() == data.numpy().tobytes()  # padded blocks truncated away
    for offset, size in ((0, data.numel()), (4095, 2), (12345, 2**20 + 7), (data.numel() - 3, 3)):
        out = torch.empty(size, dtype=torch.uint8)
        read_into(tmp_path / "f", offset, out, direct=direct)
        assert torch.equal(out, data[offset : offset + size]), (offset, size)
    with pytest.raises(EOFError):
        read_into(tmp_path / "f", data.numel() - 3, torch.empty(4, dtype=torch.uint8), direct=direct)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_row_runs_place_rows_exactly_where_the_transforms_do():
    q, k, v = (torch.randn(n, 6) for n in (16, 4, 4))
    merge = functools.partial(transforms.qkv_merge, num_query_groups=2)
    out = torch.empty(24, 6)
    for part, runs in zip((q, k, v), transforms.row_runs(merge, [16, 4, 4]), strict=True):
        for part_row, merged_row, n in runs:
            out[merged_row : merged_row + n] = part[part_row : part_row + n]
    assert torch.equal(out, merge(q, k, v))
    with pytest.raises(ValueError, match="whole rows"):
        transforms.row_runs(lambda a, b: a, [2, 2])  # drops a part


def test_a_failing_writer_thread_stops_the_reader_with_its_error():
    budget = ByteBudget(10)

    def write(job: int) -> None:
        if job == 2:
            raise OSError("disk full")
        budget.release(10)

    with pytest.raises(OSError, match="disk full"), Workers(1, write, budget) as workers:
        for job in range(100):
            budget.acquire(10)  # blocks until the writer frees room: must not hang after its failure
            workers.submit(job)


def test_read_ahead_keeps_order_and_the_budget():
    from glm45_train.formats.buffers import read_ahead

    budget, in_flight, lock = ByteBudget(10), [], threading.Lock()
    sizes = {f"t{i}": size for i, size in enumerate([3, 4, 25, 2, 6, 1, 9])}  # t2 is larger than the budget

    def fetch(name: str) -> str:
        with lock:
            in_flight.append(budget.used)
        time.sleep(0.01 * (len(name) % 3))
        return name.upper()

    seen = []
    for name, result, size in read_ahead(sizes, fetch, sizes.__getitem__, budget, depth=3):
        assert result == name.upper() and size == sizes[name]
        seen.append(name)
        budget.release(size)  # the consumer is done with it
    assert seen == list(sizes) and budget.used == 0
    assert all(used <= 10 or used == 25 for used in in_flight), in_flight  # the budget, or the big item alone
