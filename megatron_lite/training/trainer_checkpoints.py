"""The trainer's checkpoint side: resume from --load, save every --save-interval, publish async saves."""

from __future__ import annotations

import torch

from megatron_lite.training.optimizer import finish_param_sync


class TrainerCheckpoints:
    """Mixed into Trainer: uses its cfg, pstate, logger, model pieces and progress counters."""

    def load(self) -> None:
        """Resume from --load when it holds a checkpoint (weights, optimizer, schedule, RNG, progress)."""
        if not self.cfg.load:
            return
        # Imported on use: torch.distributed.checkpoint adds seconds to start-up, needed only with --load/--save.
        from megatron_lite.training.checkpointing import load_checkpoint

        timers = self.logger.timers
        timers("load-checkpoint", log_level=0).start(barrier=True)
        progress = load_checkpoint(
            self.cfg.load, self.checkpoint_module, self.optimizer, self.scheduler, self.cfg, self.pstate
        )
        timers("load-checkpoint").stop(barrier=True)
        self.logger.log_timers(["load-checkpoint"])
        if progress is None:
            return
        self.iteration = progress.iteration
        self.consumed_train_samples = progress.consumed_train_samples
        self.skipped_iterations = progress.skipped_iterations
        self.last_saved_iteration = progress.iteration
        scaler_state = (progress.extra_state or {}).get("loss_scaler")
        if scaler_state and self.cfg.fp16 and not self.cfg.finetune and not self.cfg.no_load_optim:
            self.scaler.load_state_dict(scaler_state)
        # --fp32-matmul-precision auto chooses by timing, which can differ between two starts on a busy
        # machine; the run's own earlier choice keeps a resume bit-exact.
        saved_precision = (progress.extra_state or {}).get("fp32_matmul_precision")
        if saved_precision and self.cfg.fp32_matmul_precision == "auto" and not self.cfg.finetune:
            if saved_precision != torch.get_float32_matmul_precision():
                torch.set_float32_matmul_precision(saved_precision)
                self.logger.print(
                    f"> fp32 matmul precision: {saved_precision} (the checkpointed run's choice)"
                )
        self.logger.print(
            f"> resuming from {self.cfg.load} at iteration {self.iteration}, "
            f"{self.consumed_train_samples} consumed samples"
        )

    def save(self) -> None:
        if not self.cfg.save or self.last_saved_iteration == self.iteration:
            return
        from megatron_lite.training.checkpointing import save_checkpoint

        finish_param_sync(self.optimizer)  # an --overlap-param-gather gather must land before saving
        self.logger.pause()
        self.logger.timers("save-checkpoint", log_level=0).start(barrier=False)
        save_checkpoint(
            self.cfg.save,
            self.iteration,
            self.checkpoint_module,
            self.optimizer,
            self.scheduler,
            self.cfg,
            self.pstate,
            consumed_train_samples=self.consumed_train_samples,
            extra_state={
                "loss_scaler": self.scaler.state_dict(),
                "fp32_matmul_precision": torch.get_float32_matmul_precision(),
                "skipped_iterations": self.skipped_iterations,
            },
        )
        self.last_saved_iteration = self.iteration
        self.logger.timers("save-checkpoint").stop(barrier=False)
        if self.cfg.async_save:
            self.logger.print(
                f"  scheduled an async checkpoint save at iteration {self.iteration:7d} to {self.cfg.save}"
            )
        else:
            self.logger.print(f"  saved checkpoint at iteration {self.iteration:7d} to {self.cfg.save}")
        self.logger.log_timers(["save-checkpoint"])
        self.logger.resume()

    def finalize_async_save(self, *, blocking: bool) -> None:
        """Publish a checkpoint that --async-save wrote in the background, once every rank has written it
        (collective; blocking: wait for the writes)."""
        if not self.cfg.async_save:
            return
        from megatron_lite.training.checkpointing import finalize_async_save

        published = finalize_async_save(self.pstate, blocking=blocking)
        if published is not None:
            self.logger.print(
                f"  successfully saved checkpoint from iteration {published:7d} to {self.cfg.save}"
            )
