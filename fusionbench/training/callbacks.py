"""Lightning callbacks of fusionbench."""
from __future__ import annotations

import time

import lightning as L
import torch

from fusionbench.evaluation.text_suite import TextSuite, forgetting, score_text_suite
from fusionbench.model import on_device, scoring_mode


class ForgettingCurve(L.Callback):
    """Scores a fixed slice of the text suite on the model's text-only path every
    ``every_n_steps`` optimizer steps (and at step 0, before any update), logs
    ``curve/<metric>`` to the Lightning loggers, and keeps the points for the results row:
    forgetting as it develops, not only at the end (with ``reference``, the base LM, also the token
    KL on the slice's prose: the sensitive curve)."""

    def __init__(self, suite: TextSuite, base: dict[str, float], tokenizer, every_n_steps: int, batch_size: int,
                 reference=None):
        self.suite, self.base, self.tokenizer, self.reference = suite, base, tokenizer, reference
        self.every, self.batch_size = every_n_steps, batch_size
        self.points: list[dict[str, float]] = []

    def _score(self, trainer, pl_module) -> None:
        model = pl_module.model
        was_training = model.training
        model.eval()
        # the base LM beside the model while it scores (its KL then from the same kernels: exact
        # zeros for a frozen text path on an accelerator too), eagerly like the base was scored
        with torch.no_grad(), on_device(self.reference, device=pl_module.device), scoring_mode():
            after = score_text_suite(self.suite, model, self.tokenizer,
                                     batch_size=self.batch_size, reference=self.reference)
        model.train(was_training)
        point = {"step": trainer.global_step, **{k: v for k, v in after.items() if not isinstance(v, str)},
                 **forgetting(self.base, after)}
        self.points.append(point)
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in point.items() if k != "step"}, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.points:  # a resumed run has its earlier points back (state_dict) and skips this
            self._score(trainer, pl_module)

    # the points so far travel in the checkpoint: a resumed run's curve is the uninterrupted one's
    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.points = list(state.get("points", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 and (not self.points or self.points[-1]["step"] != step):
            self._score(trainer, pl_module)


class TrainClock(L.Callback):
    """Seconds of training summed over every session a stage ran in: the seconds spent up to a
    checkpoint travel in it, so a point resumed from step N reports N steps' worth of earlier time
    plus its own (the seconds between the last checkpoint and a kill were spent but bought nothing,
    and are not counted). ``restored`` says whether a checkpoint brought its earlier seconds back
    (False for a checkpoint of an older fusionbench).

    ``machines``: where each session trained, ``{"from_step", "device", "cpu_capability",
    "cpu_model"}`` per session, carried in the checkpoint the same way: a point resumed across
    sessions may have trained on several machines, which compute different numbers."""

    def __init__(self, start: float | None = None):
        self.start = time.time() if start is None else start
        self.before, self.restored = 0.0, False
        self.machines: list[dict] = []

    def elapsed(self) -> float:
        return self.before + time.time() - self.start

    def on_train_start(self, trainer, pl_module) -> None:
        from fusionbench.results import cpu_identity, device_label

        if self.restored and not self.machines:  # a checkpoint of an older fusionbench: where it ran is unknown
            self.machines.append({"from_step": 0, "device": None})
        self.machines.append({"from_step": int(trainer.global_step), "device": device_label(pl_module.device),
                              **cpu_identity()})

    def state_dict(self) -> dict:
        return {"train_s": self.elapsed(), "machines": self.machines}

    def load_state_dict(self, state: dict) -> None:
        self.before, self.restored = float(state.get("train_s", 0.0)), True
        self.machines = list(state.get("machines", []))


class ValidationCurve(L.Callback):
    """At every validation (``trainer.val_every_n_steps``; at least once, at the end): the val LM
    loss Lightning computed and the choice accuracy on a fixed slice of the val split, logged as
    ``val/choice_acc`` to the Lightning loggers and kept for the results row (``val_curve``), with
    a plateau verdict (:func:`plateaued`): was the run still learning when it stopped? With
    ``controls`` (``eval.val_controls``) also ``val/acc_shuffled`` and ``val/image_gain`` with its
    95% interval (``val/image_gain_ci_lo`` / ``_hi``): does the model use the image yet?"""

    def __init__(self, val_items, preprocess, batch_size: int, seed: int = 0, controls: bool = False,
                 every_n_steps: int = 0):
        self.items, self.preprocess, self.batch_size, self.seed = val_items, preprocess, batch_size, seed
        self.controls, self.every = controls, every_n_steps
        self.points: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        """A run resumed from a checkpoint written at a validation step (the study checkpoints and
        validates every 150 steps): Lightning wrote the checkpoint before that validation ran, so
        its point is not in it. Run it again here, as Lightning does (the same val batches in eval
        mode, the same loader), with the random streams left as the checkpoint has them: the curve
        and the weights after it are the uninterrupted run's (one device; tested)."""
        step = trainer.global_step
        if not (self.every > 0 and step > 0 and step % self.every == 0):
            return
        if self.points and self.points[-1]["step"] >= step:
            return
        from lightning.pytorch.utilities.seed import isolate_rng

        with isolate_rng():  # training goes on with the checkpoint's random streams, as without the kill
            self._record(trainer, pl_module, self._val_loss(trainer, pl_module))

    @staticmethod
    def _val_loss(trainer, pl_module) -> float | None:
        """The val LM loss as Lightning's validation logs it: the batch-size-weighted mean of
        ``val/lm_loss`` over the first ``trainer.limit_val_batches`` val batches."""
        loader = trainer.datamodule.val_dataloader()
        limit = trainer.limit_val_batches
        n_batches = limit if isinstance(limit, int) else int(len(loader) * limit)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        total, count = 0.0, 0
        try:
            with torch.no_grad(), trainer.precision_plugin.val_step_context():
                for i, batch in enumerate(loader):
                    if i >= n_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    size = batch["input_ids"].shape[0]
                    total += float(pl_module(batch).lm_loss) * size
                    count += size
        finally:
            for m, mode in modes.items():
                m.training = mode
        return total / count if count else None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/lm_loss")
        self._record(trainer, pl_module, None if loss is None else float(loss))

    def _record(self, trainer, pl_module, loss: float | None) -> None:
        from fusionbench.evaluation.choice import evaluate_choice

        point = {"step": trainer.global_step}
        if loss is not None:
            point["val/lm_loss"] = loss
        if self.items is not None and len(self.items) >= 2:
            with torch.no_grad():
                m = evaluate_choice(pl_module.model, self.items, self.preprocess, self.batch_size, seed=self.seed,
                                    controls=self.controls)
            point["val/choice_acc"] = m["mm/choice/acc"]
            point["val/chance"] = m["mm/choice/chance"]  # the blind floor beside it (1 / #candidates)
            if self.controls:
                for k in ("acc_shuffled", "image_gain", "image_gain_ci_lo", "image_gain_ci_hi"):
                    point[f"val/{k}"] = m[f"mm/choice/{k}"]
            for logger in trainer.loggers:
                logger.log_metrics({k: v for k, v in point.items() if k.startswith("val/") and k != "val/lm_loss"},
                                   step=trainer.global_step)
        if not self.points or self.points[-1]["step"] != point["step"]:
            self.points.append(point)

    def state_dict(self) -> dict:
        return {"points": list(self.points)}

    def load_state_dict(self, state: dict) -> None:
        self.points = list(state.get("points", []))


def plateaued(points: list[dict[str, float]], key: str = "val/lm_loss", tol: float = 0.02) -> bool | None:
    """The stated convergence criterion: over the last third of the validation points (at least
    3 points in all), the val LM loss improved by less than ``tol`` relative to its value at the
    start of that third. None when there are too few points to tell (set
    ``trainer.val_every_n_steps``)."""
    values = [p[key] for p in points if key in p]
    if len(values) < 3:
        return None
    tail = values[-max(2, len(values) // 3 + 1):]
    start = tail[0]
    return bool(start - min(tail) <= tol * abs(start))
