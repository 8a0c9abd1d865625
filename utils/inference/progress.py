"""The images a prediction run has finished, so that a stopped run continues where it stopped
(``predict.py --resume``; the test protocol keeps its own, ``utils/evaluation/protocol.py``).

``<folder>/run.json`` holds what the run's results depend on (its settings and inputs, JSON) and,
per process, ``rank<r>.jsonl`` a line per image, appended once that image's files are written:
its ``scores.csv`` row, or that it was skipped.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from utils.distributed import World
from utils.errors import UsageError
from utils.files import atomic_write

__all__ = ["Progress", "changed_keys"]


def changed_keys(saved: dict, now: dict) -> list[str]:
    """The keys whose values differ between two runs' settings (a key missing on one side too)."""
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


class Progress:
    """A run's finished images in ``folder``.

    Args:
        folder: where the progress lives (``<save_path>/progress``).
        run: what the results depend on (settings and inputs), JSON-normalized; a resumed run
            must have the same.
        resume: read an earlier run's progress (where there is one) instead of starting over.
        shard: the processes of the run (one in a plain run).
    """

    def __init__(self, folder: Path, run: dict, resume: bool, shard: World):
        self.folder, self.run, self.shard = Path(folder), run, shard
        self.rows: dict[int, dict] = {}  # input index -> scores.csv row
        self.skipped: dict[int, str] = {}  # input index -> path
        if resume and self._resumable():
            self._read()
        elif shard.main:
            shutil.rmtree(self.folder, ignore_errors=True)
            atomic_write(self.folder / "run.json", json.dumps(self.run))
        shard.gather(None)  # every process has read (or process 0 has cleared) before any writes
        self.file = open(self.folder / f"rank{shard.rank}.jsonl", "a")

    def _resumable(self) -> bool:
        if (self.folder / "run.json").exists():
            return True
        if self.shard.main:
            print(f"note: --resume: no {self.folder / 'run.json'}; starting from the first "
                  "image", file=sys.stderr)
        return False

    def _read(self) -> None:
        path = self.folder / "run.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path} is not a progress file of predict.py: {e!r}",
                             option="resume")
        changed = changed_keys(saved, self.run)
        if changed:
            names = [f"--{k}" if k != "inputs" else "INPUTs" for k in changed]
            raise UsageError(f"{path} is from a run with other {', '.join(names)}",
                             option="resume")
        for part in sorted(self.folder.glob("rank*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    item = json.loads(line)
                except ValueError:  # the line that a stop cut short
                    continue
                if "row" in item:
                    self.rows[item["index"]] = item["row"]
                else:
                    self.skipped[item["index"]] = item["skipped"]

    def finished(self, index: int) -> bool:
        return index in self.rows or index in self.skipped

    def record(self, index: int, row: dict | None = None, skipped: str | None = None) -> None:
        item = {"index": index, "row": row} if row is not None else {"index": index,
                                                                     "skipped": skipped}
        self.file.write(json.dumps(item) + "\n")
        self.file.flush()

    def close(self) -> None:
        """After ``scores.csv``: the progress is no longer needed."""
        self.file.close()
        if self.shard.main:
            shutil.rmtree(self.folder, ignore_errors=True)
