"""Shared builders for the tiny tier."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from fusionbench.config import load_config
from fusionbench.data.format import Collator
from fusionbench.model import VisionLanguageModel

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "tiny.yaml"


def tiny_cfg(*overrides: str, tmp_path: Path | None = None):
    extra = [f"output_dir={tmp_path / 'runs'}", f"results_file={tmp_path / 'results.jsonl'}"] if tmp_path else []
    return load_config(TINY, [*extra, *overrides])


def tiny_model(strategy: str = "mlp", *overrides: str) -> VisionLanguageModel:
    cfg = tiny_cfg(f"fusion={strategy}", *overrides)
    return VisionLanguageModel.from_config(cfg)


def image_batch(model: VisionLanguageModel, n: int = 2, seed: int = 0):
    """A small batch of random images + questions/answers, collated for ``model``."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        pixels = (torch.rand(model.vision.image_size, model.vision.image_size, 3, generator=g) * 255).byte().numpy()
        rows.append({"image": Image.fromarray(pixels), "question": f"What color is object {i}?",
                     "answer": ["red", "blue"][i % 2], "qtype": "attribute", "relation": ""})
    collate = Collator(model.tokenizer, model.vision.preprocess, model.num_image_tokens, max_length=512)
    return collate(rows), rows


def text_batch(model: VisionLanguageModel):
    tok = model.tokenizer
    enc = tok(["The cat sat on the mat.", "Hello"], return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def train_a_few_steps(model: VisionLanguageModel, steps: int = 3, lr: float = 1e-2) -> None:
    """AdamW on the trainable set for a few steps on a fixed image batch; leaves the model in eval."""
    batch, _ = image_batch(model, n=4)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        model(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"]).loss.backward()
        opt.step()
    model.eval()
