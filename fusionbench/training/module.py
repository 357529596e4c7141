from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch

from fusionbench.config import TrainConfig
from fusionbench.model import VisionLanguageModel
from fusionbench.results import code_hash


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` as ``trainer.optimizer_impl`` says: ``fused`` (one kernel for all
    parameters, CPU and CUDA; falls back to foreach for parameters on other devices, and under
    fp16 mixed precision, whose gradient scaler must unscale before clipping) or ``foreach``."""
    params = list(params)
    scaled = str(getattr(cfg, "precision", "32-true")) in ("16-mixed", "16")
    fused = (cfg.optimizer_impl == "fused" and not scaled
             and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params))
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             **({"fused": True} if fused else {"foreach": True}))


class FusionModule(L.LightningModule):
    """Lightning wrapper around one composed model: optimiser over the trainable set of the current
    stage, LM loss + the strategy's auxiliary losses (logged separately), trainable-only checkpoints."""

    def __init__(self, model: VisionLanguageModel, train: TrainConfig):
        super().__init__()
        self.model = model
        self.train_cfg = train

    def forward(self, batch):
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"), batch.get("labels"))

    def training_step(self, batch, batch_idx):
        out = self(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/lm_loss", out.lm_loss, batch_size=bs)
        for k, v in out.aux_losses.items():
            self.log(f"train/aux/{k}", v, batch_size=bs)
        return out.loss

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        self.log("val/lm_loss", out.lm_loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        cfg = self.train_cfg
        opt = make_optimizer(params, cfg)
        total, warm = max(cfg.max_steps, 1), max(cfg.warmup_steps, 0)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            progress = (step - warm) / max(total - warm, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        """The call Lightning's default makes (``clip_grad_norm_`` over the optimizer's parameters, in
        order: the same numbers), without its mixed-precision plugin's refusal of fused AdamW: under
        bf16 autocast there is no gradient scaler, so the gradients are already the true ones (fp16
        uses foreach AdamW, and Lightning unscales before this hook)."""
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], gradient_clip_val)

    # checkpoints hold only what trains (backbones are re-created from their source)
    def on_save_checkpoint(self, checkpoint):
        keep = {f"model.{n}" for n in self.model.trainable_parameter_names()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["fusionbench_stage"] = self.model.stage
        # which code trained these weights: a run restarted after the code changed must not reuse them silently
        checkpoint["fusionbench_code_hash"] = code_hash()
        # the steps this stage trains for (a compute-matched stage's come from its FLOPs budget, not
        # trainer.max_steps): whether a checkpoint is the finished stage, for eval and sweep --dry-run
        checkpoint["fusionbench_max_steps"] = int(self.train_cfg.max_steps)
        # the random streams (dropout, ...) as they are at this step: a resumed run draws what the
        # uninterrupted one would have
        # (plain types and tensors: the checkpoint stays loadable with ``weights_only=True``)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["fusionbench_rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                                         "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss]}

    def on_load_checkpoint(self, checkpoint):
        stage = checkpoint.get("fusionbench_stage")
        if stage != self.model.stage:  # the stage decides the module layout (e.g. dense vs MoE)
            self.model.set_stage(stage)
        state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items()}
        self.model.load_trainable_state_dict(state)
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        rng = checkpoint.get("fusionbench_rng")
        self.restored_rng = rng is not None
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
            random.setstate(rng["python"])
