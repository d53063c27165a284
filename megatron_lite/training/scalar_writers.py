"""The logging rank's TensorBoard and wandb writers: output paths checked before anything is created,
and one call that writes a scalar to both."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_lite.errors import fail


def check_output_dir(path: str, flag: str) -> None:
    """One line if `path` cannot be a directory we write into (a file in the way, no permission)."""
    target = Path(path)
    if target.exists():
        if not target.is_dir():
            fail(f"{flag} {path} is a file, not a directory")
        if not os.access(target, os.W_OK | os.X_OK):
            fail(f"{flag} {path} is not writable")
        return
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        fail(f"{flag} {path} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        fail(f"{flag} {path} cannot be created: {ancestor} is not writable")


def make_output_dir(path: str, flag: str) -> Path | None:
    """Create `path`; returns the outermost directory this created (None if it existed), for cleanup."""
    target = Path(path)
    outermost = None
    probe = target
    while not probe.exists():
        outermost = probe
        probe = probe.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"{flag} {path} cannot be created: {err.strerror or err}")
    return outermost


class ScalarWriters:
    """TensorBoard (--tensorboard-dir) and wandb (--wandb-project), either or both or neither."""

    def __init__(self) -> None:
        self.tensorboard: Any = None
        self.wandb: Any = None

    @classmethod
    def open(cls, cfg: Any, print_fn: Callable[[str], None]) -> ScalarWriters:
        """Check every output path first and create them only then, so a bad one leaves nothing behind."""
        from megatron_lite.training.wandb_writer import WandbWriter, import_wandb, wandb_save_dir

        dirs = []
        if cfg.wandb_project:
            import_wandb()
            wandb_flag = "--wandb-save-dir" if cfg.wandb_save_dir else "--save (its wandb folder)"
            dirs.append((wandb_save_dir(cfg), wandb_flag))
        if cfg.tensorboard_dir:
            dirs.append((cfg.tensorboard_dir, "--tensorboard-dir"))
        for path, flag in dirs:
            check_output_dir(path, flag)
        writers, created = cls(), []
        try:
            for path, flag in dirs:
                outermost = make_output_dir(path, flag)
                if outermost is not None:
                    created.append(outermost)
            if cfg.wandb_project:
                writers.wandb = WandbWriter(cfg, dirs[0][0], cfg.to_dict())
                print_fn(f"> wandb ({writers.wandb.mode}) run in {writers.wandb.run_dir}")
            if cfg.tensorboard_dir:
                from torch.utils.tensorboard import SummaryWriter

                writers.tensorboard = SummaryWriter(
                    log_dir=cfg.tensorboard_dir, max_queue=cfg.tensorboard_queue_size
                )
                for name, value in cfg.to_dict().items():
                    writers.tensorboard.add_text(name, str(value), global_step=0)
        except BaseException:
            writers.close()
            for path in created:  # only what this run created, so nothing of the user's
                shutil.rmtree(path, ignore_errors=True)
            raise
        return writers

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalar(self, tag: str, value: float, iteration: int, consumed_samples: int | None = None) -> None:
        """`tag` at this iteration, and its `{tag} vs samples` twin (TensorBoard only) when given the samples."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, iteration)
            if consumed_samples is not None:
                self.tensorboard.add_scalar(f"{tag} vs samples", value, consumed_samples)
        if self.wandb is not None:
            self.wandb.log({tag: value}, iteration)

    def tensorboard_only(
        self, tag: str, value: float, iteration: int, consumed_samples: int | None = None
    ) -> None:
        """What Megatron writes to TensorBoard alone (the mem-* values, the validation ppl)."""
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, iteration)
            if consumed_samples is not None:
                self.tensorboard.add_scalar(f"{tag} vs samples", value, consumed_samples)

    def wandb_only(self, values: dict[str, float], iteration: int) -> None:
        if self.wandb is not None:
            self.wandb.log(values, iteration)

    def close(self) -> None:
        if self.tensorboard is not None:
            writer, self.tensorboard = self.tensorboard, None
            writer.flush()
            writer.close()
        if self.wandb is not None:
            run, self.wandb = self.wandb, None
            run.close()
