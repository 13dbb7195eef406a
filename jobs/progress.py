"""A sharded job's progress: a tqdm bar on a terminal, one line per finished shard otherwise, and always a line
per shard in <run folder>/progress.log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


@dataclass
class Progress:
    """One tqdm bar on a terminal (shards, examples/s, ETA); otherwise one line per finished shard.
    Either way each finished shard is appended to <run folder>/progress.log."""

    desc: str
    total_shards: int
    total_examples: int
    log_path: Path
    show: bool = True
    done_shards: int = 0
    done_examples: int = 0
    started: float = field(default_factory=time.monotonic)
    bar: Any = None  # a tqdm bar on a terminal

    def __post_init__(self):
        self.tty = self.show and sys.stdout.isatty()
        if self.tty:
            self.bar = tqdm(total=self.total_shards, desc=self.desc, unit="shard", file=sys.stdout)

    def update(self, shard: int, examples: int, node: str) -> None:
        self.done_shards += 1
        self.done_examples += examples
        elapsed = time.monotonic() - self.started
        rate = self.done_examples / elapsed if elapsed > 0 else 0.0
        left = (self.total_examples - self.done_examples) / rate if rate > 0 else float("nan")
        line = (
            f"{time.strftime('%H:%M:%S')} {self.desc}: shard {shard} done ({examples} examples, node {node[:12]}); "
            f"{self.done_shards}/{self.total_shards} shards, {rate:.2f} examples/s, ETA {_duration(left)}"
        )
        with self.log_path.open("a") as log:
            log.write(line + "\n")
        if self.tty:
            self.bar.set_postfix_str(f"{rate:.2f} ex/s", refresh=False)
            self.bar.update(1)
        elif self.show:
            print(line, flush=True)

    def note(self, message: str) -> None:
        with self.log_path.open("a") as log:
            log.write(f"{time.strftime('%H:%M:%S')} {self.desc}: {message}\n")
        if self.show:
            (self.bar.write if self.tty else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if seconds != seconds:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"
