"""A run directory: every path a run reads or writes, and the record of its best FID.

    WORKDIR/.lock                        the writer lock (`workdir_lock`)
    WORKDIR/config.json                  the config of the newest training run (history in config_history.jsonl)
    WORKDIR/checkpoints/<step>/          train state + metadata (`checkpoint`)
    WORKDIR/grids/step_<step>.png        sample grids during training
    WORKDIR/samples/batch_*.npz          sample mode (`sample.path` may put them elsewhere); prompts/ for prompts
    WORKDIR/eval/fid_<step>.json         the FID of a saved step, written when it is known
    WORKDIR/eval/best.json               {"step", "fid"}: the lowest FID among the saved steps (derived, see below)
    WORKDIR/eval/metrics_<time>.json     eval mode; ref_stats_*.npz and class_frequencies_*.npy are caches
    WORKDIR/benchmark.json               benchmark mode
    WORKDIR/converted/, nnet_ema.pth     convert mode's default outputs; features/ is extract mode's

The best step. A step's FID is known only after its checkpoint is saved, and a run can stop between the two; so the
truth is the FID records (`eval/fid_<step>.json`, one per step, written once the FID exists) together with the steps
still on disk: `best(steps)` is the lowest recorded FID among `steps`. `eval/best.json` is that answer written down
for people; nothing reads it back. A record belongs to the save it followed: when a step is saved again (after a
corrupt step was set aside) its old record is dropped (`BestRecord.saved`).
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

from uvit_jax import files

_FID_RECORD = re.compile(r"fid_(\d+)\.json")


class RunDir:
    """The paths of the run in `workdir` (a local path or a `scheme://` URL), and its best-FID record."""

    def __init__(self, workdir: str | os.PathLike):
        self.root = os.fspath(workdir)

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def lock(self) -> str:
        return self._path(".lock")

    @property
    def config(self) -> str:
        return self._path("config.json")

    @property
    def config_history(self) -> str:
        return self._path("config_history.jsonl")

    @property
    def checkpoints(self) -> str:
        return self._path("checkpoints")

    @property
    def grids(self) -> str:
        return self._path("grids")

    def grid(self, step: int) -> str:
        return os.path.join(self.grids, f"step_{int(step):08d}.png")

    @property
    def samples(self) -> str:
        return self._path("samples")

    @property
    def prompts(self) -> str:
        return self._path("prompts")

    @property
    def eval(self) -> str:
        return self._path("eval")

    def fid_record(self, step: int) -> str:
        return os.path.join(self.eval, f"fid_{int(step)}.json")

    @property
    def best_record(self) -> str:
        return os.path.join(self.eval, "best.json")

    def metrics(self, stamp: str) -> str:
        return os.path.join(self.eval, f"metrics_{stamp}.json")

    def ref_stats_cache(self, dataset: str, image_size: int) -> str:
        return os.path.join(self.eval, f"ref_stats_{dataset}_{int(image_size)}.npz")

    def class_frequencies_cache(self, dataset: str) -> str:
        return os.path.join(self.eval, f"class_frequencies_{dataset}.npy")

    @property
    def benchmark(self) -> str:
        return self._path("benchmark.json")

    @property
    def converted(self) -> str:
        return self._path("converted")

    @property
    def official_params(self) -> str:
        return self._path("nnet_ema.pth")

    @property
    def features(self) -> str:
        return self._path("features")

    def fids(self) -> dict[int, float]:
        """{step: FID} of every FID record in eval/ (an unreadable record is skipped: its write never finished)."""
        if not os.path.isdir(self.eval):
            return {}
        out = {}
        for name in os.listdir(self.eval):
            match = _FID_RECORD.fullmatch(name)
            if not match:
                continue
            try:
                with open(os.path.join(self.eval, name)) as f:
                    out[int(match.group(1))] = float(json.load(f)["fid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def best(self, steps: Iterable[int]) -> dict | None:
        """{"step", "fid"}: the lowest recorded FID among `steps` (the checkpoints on disk), or None."""
        return _lowest(self.fids(), steps)


def _lowest(fids: dict[int, float], steps: Iterable[int]) -> dict | None:
    known = [(fids[s], s) for s in {int(s) for s in steps} if s in fids]
    if not known:
        return None
    fid, step = min(known)
    return {"step": step, "fid": fid}


_UNKNOWN = object()


class BestRecord:
    """The FIDs of a training run's steps and the step to keep: every process of a run holds the same record in
    memory (read once at start, then updated with the FIDs every process computes); one (`writer`) writes it.

    Args:
      run: the run directory.
      writer: whether this process writes eval/ (process 0).
    """

    def __init__(self, run: RunDir, *, writer: bool):
        self.run, self.writer = run, writer
        self._fids = run.fids()
        self._written: dict | None | object = _UNKNOWN  # what best.json holds; the first `best` call rewrites it

    def has_fid(self, step: int) -> bool:
        return int(step) in self._fids

    def saved(self, step: int) -> None:
        """`step` was just saved: a FID recorded for that step number described an earlier save."""
        if self._fids.pop(int(step), None) is not None and self.writer:
            os.remove(self.run.fid_record(step))

    def add(self, step: int, record: dict) -> None:
        """The FID of `step` arrived (`record` holds at least "fid"; written as eval/fid_<step>.json)."""
        self._fids[int(step)] = float(record["fid"])
        if self.writer:
            files.write_json(self.run.fid_record(step), {**record, "step": int(step)})

    def best(self, steps: Iterable[int]) -> dict | None:
        """The lowest FID among `steps` (the checkpoints on disk): the step the checkpointer must keep. The writer
        brings eval/best.json up to date with it (removed when there is none)."""
        best = _lowest(self._fids, steps)
        if self.writer and best != self._written:
            if best is not None:
                files.write_json(self.run.best_record, best)
            elif os.path.exists(self.run.best_record):
                os.remove(self.run.best_record)
            self._written = best
        return best
