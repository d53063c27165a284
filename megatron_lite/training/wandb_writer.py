"""--wandb-project: the run's TensorBoard scalars in Weights & Biases (the optional `wandb` package)."""

from __future__ import annotations

import netrc
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlparse

from megatron_lite.errors import fail

INSTALL_HINT = "pip install 'megatron-lite[wandb]' (or pip install wandb)"


def wandb_save_dir(cfg: Any) -> str:
    """--wandb-save-dir, or Megatron's default: the wandb folder of --save."""
    return cfg.wandb_save_dir if cfg.wandb_save_dir else os.path.join(cfg.save, "wandb")


def import_wandb() -> Any:
    """The wandb module, or one line saying how to install it."""
    try:
        import wandb
    except ImportError:
        fail(f"--wandb-project needs the wandb package: {INSTALL_HINT}")
    return wandb


def wandb_mode(env: Mapping[str, str] | None = None, netrc_file: str | None = None) -> str:
    """WANDB_MODE when set; else online when wandb has credentials (WANDB_API_KEY, or `wandb login`'s
    netrc entry for its host), as Megatron's runs are; else offline, since without them an online run
    cannot start (the run stays in the save directory for `wandb sync`)."""
    env = os.environ if env is None else env
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"]
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        if host and netrc.netrc(netrc_file).authenticators(host):
            return "online"
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbWriter:
    """One wandb run on the logging rank, logged with the iteration as wandb's step (mode: wandb_mode)."""

    def __init__(self, cfg: Any, save_dir: str, config: dict[str, Any]) -> None:
        wandb = import_wandb()
        self.mode = wandb_mode()
        kwargs: dict[str, Any] = {
            "dir": save_dir,
            "name": cfg.wandb_exp_name,
            "project": cfg.wandb_project,
            "config": config,
            "mode": self.mode,
        }
        if cfg.wandb_entity:
            kwargs["entity"] = cfg.wandb_entity
        try:
            self.run = wandb.init(**kwargs)
        except Exception as err:  # wandb raises its own error types for login, network and settings
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            fail(f"--wandb-project {cfg.wandb_project}: wandb could not start a run ({reason})")

    @property
    def run_dir(self) -> str:
        """Where this run's files are (what `wandb sync` takes)."""
        return os.path.dirname(self.run.dir)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
