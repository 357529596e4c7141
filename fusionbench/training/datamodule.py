from __future__ import annotations

import functools
import itertools

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from fusionbench.config import DataConfig, TrainConfig
from fusionbench.data import DATASETS
from fusionbench.data.format import Collator, check_lengths
from fusionbench.errors import FusionBenchError


def build_split(cfg: DataConfig, split: str):
    ds = DATASETS.get(cfg.name)(cfg, split)
    if len(ds) == 0:
        raise FusionBenchError(f"dataset {cfg.name!r} split {split!r} is empty")
    missing = {"image", "question", "answer", "qtype"} - set(ds.column_names)
    if missing:
        raise FusionBenchError(f"dataset {cfg.name!r} lacks columns {sorted(missing)}")
    return ds


class FusionDataModule(L.LightningDataModule):
    """Train / val / test splits of one registered dataset, collated for one model. Training
    images follow ``data.images`` (real, or a blind baseline's shuffled / blank ones); val and
    test keep their real images."""

    def __init__(self, data: DataConfig, train: TrainConfig, tokenizer, preprocess, num_image_tokens: int, seed: int = 0):
        super().__init__()
        self.data_cfg, self.train_cfg = data, train
        self.tokenizer, self.preprocess, self.num_image_tokens, self.seed = tokenizer, preprocess, num_image_tokens, seed
        self.train_ds = self.val_ds = None
        self._test_ds = None
        #: the optimizer step a resumed ``fit`` continues from (set from the checkpoint by
        #: :meth:`load_state_dict`; 0: from the start)
        self.resume_step = 0
        #: whether the training order after a resume is the uninterrupted run's (None: not resumed)
        self.resume_exact: bool | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        from fusionbench.data.controls import blind_images

        train = build_split(self.data_cfg, "train")
        self.val_ds = build_split(self.data_cfg, "val")
        for name, ds in (("train", train), ("val", self.val_ds)):
            check_lengths(self.tokenizer, ds, self.num_image_tokens, self.train_cfg.max_length, f"{self.data_cfg.name}/{name}")
        if len(train) < self.train_cfg.batch_size:
            raise FusionBenchError(f"dataset {self.data_cfg.name!r} has {len(train)} training examples, fewer than "
                                   f"trainer.batch_size={self.train_cfg.batch_size}: no full batch to train on")
        self.train_ds = blind_images(train, self.data_cfg.images, self.data_cfg.seed)

    @staticmethod
    def short_answers(ds):
        """``ds`` without caption rows: the items choice scoring and exact match score."""
        return ds.filter(lambda t: t != "caption", input_columns="qtype")

    @functools.cached_property
    def short_test(self):
        """:attr:`test_ds` without caption rows (built once, shared by the checks before training
        and by the evaluators)."""
        return self.short_answers(self.test_ds)

    @property
    def test_ds(self):
        """The test split (built on first use: only evaluation needs it); the same items for every
        strategy and seed of a data config."""
        if self._test_ds is None:
            ds = build_split(self.data_cfg, "test")
            check_lengths(self.tokenizer, ds, self.num_image_tokens, self.train_cfg.max_length, f"{self.data_cfg.name}/test")
            self._test_ds = ds
        return self._test_ds

    def collator(self, with_answer: bool = True, with_image: bool = True) -> Collator:
        return Collator(self.tokenizer, self.preprocess, self.num_image_tokens, self.train_cfg.max_length,
                        with_answer=with_answer, with_image=with_image)

    def train_dataloader(self):
        """Shuffled with a generator seeded by the run's seed, the last partial batch dropped (every
        epoch has ``len(train) // batch_size`` batches). After a resume from step ``s`` the loader
        continues the uninterrupted run's order exactly: the generator replays the draws of the
        ``s // batches`` finished epochs (an index-only read of the same loader, stopped after its
        last batch as Lightning stops) and the current
        epoch skips its first ``s % batches`` batches without loading them."""
        g = torch.Generator().manual_seed(self.seed)
        bs, workers = self.train_cfg.batch_size, self.train_cfg.num_workers
        step, self.resume_exact = self.resume_step, None
        if step:
            if self.trainer is not None and self.trainer.world_size > 1:
                # Lightning re-creates a distributed loader with its own sampler: not replayed
                self.resume_exact = False
            else:
                per_epoch = len(self.train_ds) // bs
                epochs, skip = divmod(step, per_epoch)
                index_only = list(range(len(self.train_ds)))
                for _ in range(epochs):  # Lightning reads an epoch's batches and stops (no StopIteration)
                    for _ in itertools.islice(DataLoader(index_only, batch_size=bs, shuffle=True, generator=g,
                                                         drop_last=True, collate_fn=len), per_epoch):
                        pass
                self.resume_exact = True
                if skip:
                    batches = _SkipFirst(BatchSampler(RandomSampler(self.train_ds, generator=g), bs, drop_last=True),
                                         skip)
                    return DataLoader(self.train_ds, batch_sampler=batches, generator=g, collate_fn=self.collator(),
                                      num_workers=workers)
        return DataLoader(self.train_ds, batch_size=bs, shuffle=True, generator=g,
                          collate_fn=self.collator(), num_workers=workers, drop_last=True)

    # saved in every Lightning checkpoint and restored before ``train_dataloader`` on resume
    def state_dict(self) -> dict:
        return {"global_step": self.trainer.global_step if self.trainer is not None else 0,
                "seed": self.seed, "batch_size": self.train_cfg.batch_size, "train_size": len(self.train_ds)}

    def load_state_dict(self, state: dict) -> None:
        same = (state.get("seed"), state.get("batch_size"), state.get("train_size")) == \
            (self.seed, self.train_cfg.batch_size, len(self.train_ds))
        if not same:
            raise FusionBenchError(f"the checkpoint was written for another training order ({state}); "
                                   "delete the run folder to start this point again")
        self.resume_step = int(state["global_step"])

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=self.train_cfg.batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.train_cfg.num_workers)


class _SkipFirst(Sampler):
    """A batch sampler whose first pass leaves out its first ``skip`` batches (drawn, so the
    generator advances as in the uninterrupted pass, but never loaded); later passes are whole."""

    def __init__(self, batches: BatchSampler, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        it = iter(self.batches)
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            next(it)
        yield from it

    def __len__(self) -> int:
        return len(self.batches)
