"""What a conversion reports: progress while it runs (bytes, with ETA in the CLI) and a summary at the end.

Library code never prints: it calls a `Progress` (the CLI passes a tqdm bar, tests pass nothing) and returns a
`ConversionSummary`. Peak RSS is the process's high-water mark (`getrusage`), so it includes the import baseline.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Progress(Protocol):
    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def close(self) -> None: ...


class NullProgress:
    """Reports nothing (the default for library calls and tests)."""

    def start(self, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class ConversionSummary:
    direction: str  # "hf->mcore" or "mcore->hf"
    output_dir: Path
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    notes: list[str] = field(default_factory=list)  # what the user should know about this output
    _started: float = field(default_factory=time.perf_counter, repr=False)

    def finish(self) -> ConversionSummary:
        self.seconds = time.perf_counter() - self._started
        self.peak_rss_bytes = peak_rss_bytes()
        return self

    @property
    def gb_per_s(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        return (
            f"{self.direction}: {self.tensors} tensors, {self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s "
            f"({self.gb_per_s:.3f} GB/s), peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB -> {self.output_dir}"
        ) + "".join(f"\n  note: {note}" for note in self.notes)
