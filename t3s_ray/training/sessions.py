"""Sessions: where a rank's checkpoints go and its reports are made, behind one protocol (``Session``).

* ``LocalSession``: ``root/step-NNNNNN`` folders on a filesystem every rank shares (no Ray): a one-rank
  run or a plain ``torch.distributed`` group (``trainer.train_standalone``, ``bench/gpu_check.py``);
* ``RaySession``: Ray Train's checkpoints and reports (``train.train_loop_per_worker``). The one
  module of ``training/`` that touches Ray, and only inside its methods, so that the rest runs where
  Ray is not installed.

Both write a checkpoint the same way (``write_checkpoint_folder``): every rank straight into the
folder on the shared storage.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol

from .. import distributed as dist_utils
from ..distributed import Ranks


class Session(Protocol):
    """What ``StudentTrainer`` asks of a session."""

    def latest_checkpoint(self) -> ContextManager[Path | None]:
        """The folder of the latest complete checkpoint to resume from, or None, readable inside the context."""

    def save_checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        """Every rank calls it at a checkpoint step: ``write(folder)`` writes this rank's part."""


def write_checkpoint_folder(folder: Path, is_main: bool, write: Callable[[Path], None]) -> None:
    """Every rank writes its part of one checkpoint straight into ``folder``, on the storage that all
    ranks share (never staged in node-local ``/tmp`` first: Qwen3-8B's sharded weights and AdamW
    state are 98 GB per checkpoint, Qwen3-32B's 393 GB, more than a node's local disk or a tmpfs
    ``/tmp`` in host RAM can take). Rank 0 empties the folder first (what an interrupted attempt at
    the same step left), and no rank returns before every rank has written."""
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    dist_utils.barrier()
    write(folder)
    dist_utils.barrier()


class LocalSession:
    """Checkpoints in ``root/step-NNNNNN`` folders on a filesystem every rank shares (no Ray)."""

    def __init__(self, root: Path, ranks: Ranks, keep_last: int = 0):
        self.root, self.ranks, self.keep_last = Path(root), ranks, keep_last

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        done = sorted(p for p in self.root.glob("step-*") if (p / ".complete").exists())
        yield done[-1] if done else None

    def save_checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        folder = self.root / f"step-{step:06d}"
        write_checkpoint_folder(folder, self.ranks.is_main, write)
        if self.ranks.is_main:
            (folder / ".complete").write_text("ok\n")
            done = sorted(p for p in self.root.glob("step-*") if (p / ".complete").exists())
            for old in done[: -self.keep_last] if self.keep_last else []:
                shutil.rmtree(old)


class RaySession:
    """Ray Train's checkpoints and reports (inside a ``TorchTrainer`` worker)."""

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def save_checkpoint(self, step: int, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        """Every rank writes its shard straight into the checkpoint's folder in the run's storage, then
        reports it with ``NO_UPLOAD``: Ray Train registers the folder as it is (its default would
        have each rank stage its files in local ``/tmp`` and copy them over)."""
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        ctx = ray.train.get_context()
        name = f"checkpoint_step-{step:06d}"
        folder = Path(ctx.get_storage().experiment_fs_path) / name
        write_checkpoint_folder(folder, ctx.get_world_rank() == 0, write)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)), checkpoint_dir_name=name,
                         checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
