from __future__ import annotations

import functools

import lightning as L
import torch
from torch.utils.data import DataLoader

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

    def setup(self, stage: str | None = None) -> None:
        if self.train_ds is not None:
            return
        from fusionbench.data.controls import blind_images

        train = build_split(self.data_cfg, "train")
        self.val_ds = build_split(self.data_cfg, "val")
        for name, ds in (("train", train), ("val", self.val_ds)):
            check_lengths(self.tokenizer, ds, self.num_image_tokens, self.train_cfg.max_length, f"{self.data_cfg.name}/{name}")
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
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_ds, batch_size=self.train_cfg.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collator(), num_workers=self.train_cfg.num_workers, drop_last=True)

    def val_dataloader(self):
        return DataLoader(self.val_ds, batch_size=self.train_cfg.batch_size, shuffle=False,
                          collate_fn=self.collator(), num_workers=self.train_cfg.num_workers)
