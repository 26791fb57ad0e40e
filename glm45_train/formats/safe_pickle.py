"""Unpickling checkpoint files without running code from them: one allow-list for every pickle in a torch_dist dir.

A pickle names the functions and classes it calls (`GLOBAL module name`); unpickling imports and calls them, so a
crafted file runs whatever it names (`os.system`, `pathlib.Path.touch`, ...). Every pickle we read from a
checkpoint resolves globals only from an allow-list and refuses anything else, naming the file and the global:

- `.metadata` (a plain pickle of DCP's `Metadata`, which PyTorch itself opens with bare `pickle.load`):
  `load_dcp_metadata`, building only `DCP_METADATA_GLOBALS`: exactly what torch 2.13 + megatron-core 0.16.1 write
  (inspected with pickletools in `export --to-mcore` output and in full and LoRA training checkpoints), plus plain
  containers. Each is a data class, an enum, a dtype or a pure lookup: called with any arguments it builds a value
  and does nothing else.
- `torch.save` records (`common.pt`; the tensor and object records inside `.distcp` files): `torch_load`. Its
  `data.pkl` is first walked with stand-ins for every allowed global (`RECORD_GLOBALS`, again exactly what those
  checkpoints hold; nothing real is built), which names the first refused global in any pickle protocol; then
  `torch.load(weights_only=True)` builds it, with only the numpy pieces of the NumPy RNG state added to torch's
  own list, and never `weights_only=False` whatever the environment says.
- `check_plain_pickle`: bytes that a library will `pickle.loads` itself (Transformer Engine's extra state) must
  name no global at all.

A newer PyTorch may add a harmless class; the refusal then says how to allow it: `allow(name)` in the process
before loading, or an entry in the lists below. A refused name is never imported to judge it: importing the module
a file names would already run that module's code.
"""

from __future__ import annotations

import importlib
import io
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import torch

from glm45_train.errors import UserError

_DTYPES = frozenset(f"torch.{name}" for name, value in vars(torch).items() if isinstance(value, torch.dtype))

# What DCP `.metadata` is made of (torch 2.13, megatron-core 0.16.1), as `module.name`.
DCP_METADATA_GLOBALS = _DTYPES | {
    # torch.distributed.checkpoint's metadata dataclasses and enum
    "torch.distributed.checkpoint.metadata.Metadata",
    "torch.distributed.checkpoint.metadata.TensorStorageMetadata",
    "torch.distributed.checkpoint.metadata.BytesStorageMetadata",
    "torch.distributed.checkpoint.metadata.ChunkStorageMetadata",
    "torch.distributed.checkpoint.metadata.TensorProperties",
    "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.metadata.MetadataIndex",
    "torch.distributed.checkpoint.metadata.StorageMeta",
    "torch.distributed.checkpoint.filesystem._StorageInfo",
    # the save plans Megatron's planner caches in training checkpoints (dataclasses, one enum)
    "torch.distributed.checkpoint.planner.SavePlan",
    "torch.distributed.checkpoint.planner.WriteItem",
    "torch.distributed.checkpoint.planner.WriteItemType",
    "torch.distributed.checkpoint.planner.TensorWriteData",
    # torch values: shapes, layouts (a lookup by name); dtypes above
    "torch.Size",
    "torch.serialization._get_layout",
    # StorageMeta.checkpoint_id when the writer was given a Path
    "pathlib.PosixPath",
    # plain containers
    "collections.OrderedDict",
    "builtins.set",
    "builtins.frozenset",
}

# NumPy's RNG state in training checkpoints (an MT19937 key array; numpy 2 names). torch.load(weights_only=True)
# needs them added, and also the array's dtype class, which the pickle builds without naming it.
_NUMPY_RNG_STATE = frozenset({"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"})
_NUMPY_BUILT_UNNAMED = frozenset({"numpy.dtypes.UInt32DType"})

# What torch.save records in those checkpoints name: tensors (storages, dtypes), bytes, ordered dicts, NumPy state.
RECORD_GLOBALS = (
    _DTYPES
    | _NUMPY_RNG_STATE
    | {f"torch.{name}" for name in dir(torch) if name.endswith("Storage")}
    | {
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch.storage.UntypedStorage",
        "collections.OrderedDict",
        "_codecs.encode",
    }
)

_allowed_by_caller: set[str] = set()
# Libraries whose newer versions may add data classes to a checkpoint: their refusals say how to allow one.
_LIBRARIES_OF_CHECKPOINTS = ("torch", "numpy")


class RefusedGlobal(UserError, pickle.UnpicklingError):
    """A checkpoint file names a function or class outside the allow-list; nothing of it was run."""

    def __init__(self, source: str, name: str) -> None:
        self.source, self.name = source, name
        super().__init__(_refusal(source, name))

    def __reduce__(self) -> tuple[Any, ...]:  # DCP pickles a rank's exception to gather it
        return (RefusedGlobal, (self.source, self.name))


class UnreadablePickle(UserError, ValueError):
    """A checkpoint file that is not the pickle it should be (truncated, corrupt, or of another kind)."""


def allow(*names: str) -> None:
    """Allow more `module.name` globals in checkpoint pickles of this process (e.g. a newer PyTorch's class).

    Only for names you have read and know to be plain data: an allowed global is called with whatever
    arguments the file gives it.
    """
    for name in names:
        module, _, attribute = name.rpartition(".")
        if not module or not attribute:
            raise UserError(f"allow({name!r}): expected module.name, e.g. torch.distributed.checkpoint.metadata.X")
    _allowed_by_caller.update(names)


def _refusal(source: str, name: str) -> str:
    if name.split(".", 1)[0] in _LIBRARIES_OF_CHECKPOINTS:
        return (
            f"{source}: refused to unpickle {name}: not among the classes a torch_dist checkpoint is made of as "
            f"written by torch {torch.__version__} (perhaps a newer version's). If you trust this checkpoint and "
            f"{name} is plain data, allow it: call glm45_train.formats.safe_pickle.allow({name!r}) before loading, "
            "or add it to DCP_METADATA_GLOBALS (RECORD_GLOBALS for records) in glm45_train/formats/safe_pickle.py"
        )
    return (
        f"{source}: refused to unpickle {name}: a torch_dist checkpoint has no reason to name it, and unpickling "
        "it could run code from the file (a crafted checkpoint?). Nothing from it was run; do not open this "
        "checkpoint unless you trust where it came from"
    )


def _resolve(name: str) -> Any:
    module, _, attribute = name.rpartition(".")
    return getattr(importlib.import_module(module), attribute)


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only allowed globals (every call a pickle makes goes through find_class); `stand_ins` resolves
    each to `_StandIn` instead, to walk a pickle without building anything."""

    def __init__(self, file: IO[bytes], allowed: frozenset[str], source: str, stand_ins: bool = False) -> None:
        super().__init__(file)
        self.allowed, self.source, self.stand_ins = allowed, source, stand_ins

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if qualified not in self.allowed and qualified not in _allowed_by_caller:
            raise RefusedGlobal(self.source, qualified)
        return _StandIn if self.stand_ins else _resolve(qualified)

    def persistent_load(self, pid: Any) -> Any:
        if self.stand_ins:
            return _StandIn()
        raise pickle.UnpicklingError(f"persistent id {pid!r} (a torch.save file, not a plain pickle)")


class _StandIn:
    """Takes the place of any allowed global and of whatever it would build, so a walk builds nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _StandIn:
        return _StandIn()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


def load_dcp_metadata(path: Path) -> Any:
    """The `torch.distributed.checkpoint.metadata.Metadata` pickled in a DCP `.metadata` file, safely."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with open(path, "rb") as file:
            metadata = _AllowListUnpickler(file, DCP_METADATA_GLOBALS, str(path)).load()
    except RefusedGlobal:
        raise
    except OSError as err:
        raise UnreadablePickle(f"{path}: cannot read ({err.strerror})") from None
    except Exception as err:  # a corrupt pickle raises anything an allowed constructor may raise
        raise UnreadablePickle(f"{path}: not a readable DCP metadata pickle ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise UnreadablePickle(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


def _walk(raw: bytes, allowed: frozenset[str], source: str) -> None:
    try:
        _AllowListUnpickler(io.BytesIO(raw), allowed, source, stand_ins=True).load()
    except RefusedGlobal:
        raise
    except Exception as err:
        raise UnreadablePickle(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from None


def check_plain_pickle(raw: bytes, *, source: str) -> None:
    """Refuse pickle bytes that name any global (what plain values — None, numbers, strings, containers — never do)."""
    _walk(raw, frozenset(), source)


class CorruptRecord(UserError):
    """A torch.save record whose tensor bytes do not match the CRC32 written with them."""


def check_record_crc(value: Any, crc: int, source: str) -> None:
    """A loaded tensor's storage against its record's CRC32 (0: none written, nothing to check)."""
    if not crc or not isinstance(value, torch.Tensor):
        return
    storage = torch.empty(0, dtype=torch.uint8).set_(value.untyped_storage())
    if zlib.crc32(storage.numpy().data) != crc:
        raise CorruptRecord(f"{source}: the tensor's bytes do not match the record's CRC32 (damaged file)")


def torch_load(file: IO[bytes] | bytes, *, source: str) -> Any:
    """A torch.save record, built by `torch.load(weights_only=True)` once its pickle names only RECORD_GLOBALS."""
    stream = io.BytesIO(file) if isinstance(file, bytes) else file
    start = stream.tell()
    try:
        with zipfile.ZipFile(stream) as archive:
            pickle_name = next(name for name in archive.namelist() if name.endswith("data.pkl"))
            storages = [info.CRC for info in archive.infolist() if "/data/" in info.filename]
            with archive.open(pickle_name) as member:
                if not archive.getinfo(pickle_name).CRC:
                    # records our writer made before it wrote CRCs carry 0 (torch.load never checks one): zipfile's
                    # check is switched off, as its own reader does when there is no reference value
                    member._expected_crc = None  # type: ignore[attr-defined]
                raw = member.read()
    except (zipfile.BadZipFile, StopIteration, OSError, EOFError) as err:  # a bad CRC is a BadZipFile
        raise UnreadablePickle(f"{source}: not a torch.save record ({type(err).__name__}: {err})") from None
    _walk(raw, RECORD_GLOBALS, source)
    stream.seek(start)
    extra = _NUMPY_RNG_STATE | _NUMPY_BUILT_UNNAMED | _allowed_by_caller
    try:
        with torch.serialization.safe_globals([_resolve(name) for name in sorted(extra)]):
            value = torch.load(stream, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what a walk cannot see (a class built without being named, say)
        found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(Check the documentation|$)", str(err), re.S)
        reason = " ".join((found.group(1) if found else str(err)).split())
        raise UnreadablePickle(f"{source}: refused by torch.load(weights_only=True): {reason}") from None
    check_record_crc(value, storages[0] if len(storages) == 1 else 0, source)
    return value
