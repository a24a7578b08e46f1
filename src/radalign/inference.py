"""Use a trained model without any training code: ``model = radalign.load("runs/clip/export")``.

``load`` rebuilds the method from the exported config.json, loads model.safetensors and the saved tokenizer,
and returns an ``Encoder`` that embeds images and report texts into the shared space (L2-normalised), and scores
texts against images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from radalign.errors import ConfigError


class Encoder:
    """A frozen pre-trained model: images and texts in, normalised embeddings out."""

    def __init__(self, method: Any, tokenizer: Any, max_length: int) -> None:
        self.method = method.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        loader = method.config.loader
        self.modality = loader.modality
        self.image_size = loader.image_size
        self.volume_size = tuple(loader.volume_size)
        self.volume_spacing_mm = tuple(loader.volume_spacing_mm)

    @property
    def transform(self) -> Any:
        """The evaluation transform at the training size (pad to square, resize, normalise; for CT: resample,
        crop or pad, HU window): what ``encode_images`` expects its input to have been through."""
        from radalign.data import transforms

        if self.modality == "ct":
            return transforms.build_volume_transform(self.volume_size, spacing_mm=self.volume_spacing_mm, train=False)
        return transforms.build_image_transform("none", self.image_size, train=False)

    def prepare_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """Image files (DICOM, PNG/JPEG/TIFF, NIfTI, a DICOM series folder) -> the batch ``encode_images`` takes."""
        import numpy as np

        from radalign.data.io import read_image

        transform, batch = self.transform, []
        for path in paths:
            image = read_image(path, expect=self.modality)
            tensor = torch.from_numpy(np.ascontiguousarray(image.array, dtype=np.float32))[None]
            batch.append(transform(tensor, image.spacing))
        return torch.stack(batch)

    def _check_images(self, images: Any) -> None:
        """Wrong input embeds wrongly without a sound; say what came in and what is expected instead."""
        from radalign.data.transforms import IMAGE_MEAN, IMAGE_STD

        ndim = 5 if self.modality == "ct" else 4
        shape = "(N, 1, D, H, W) volumes" if ndim == 5 else "(N, 1, H, W) radiographs"
        how = "model.prepare_images([paths...]) reads and transforms files"
        if not isinstance(images, torch.Tensor):
            raise ConfigError(
                f"encode_images takes a tensor of transformed {shape}, not {type(images).__name__}; {how}"
            )
        if images.ndim != ndim or images.shape[1] != 1:
            extra = " (one image: add the batch dimension, images[None])" if images.ndim == ndim - 1 else ""
            raise ConfigError(f"encode_images expects {shape}; got shape {tuple(images.shape)}{extra}; {how}")
        if not images.is_floating_point():
            raise ConfigError(f"encode_images got {images.dtype} pixels, not transformed images; {how}")
        if images.numel() and ndim == 4:
            low, high = float(images.min()), float(images.max())
            if low >= 0.0 and high <= 1.0:
                raise ConfigError(
                    "encode_images got values in [0, 1]: untransformed pixels (the model was trained on "
                    f"(x - {IMAGE_MEAN}) / {IMAGE_STD}, which puts a radiograph's dark background below 0); apply "
                    f"model.transform to each (1, H, W) image, or {how}"
                )
            if high > 50.0 or low < -50.0:
                raise ConfigError(
                    f"encode_images got values in [{low:.0f}, {high:.0f}]: raw pixel values, not transformed "
                    f"images; {how}"
                )

    @property
    def device(self) -> torch.device:
        return next(self.method.parameters()).device

    def to(self, device: str | torch.device) -> Encoder:
        self.method.to(device)
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 1, H, W) radiographs (or (N, 1, D, H, W) volumes) through ``transform`` -> (N, D) on the CPU.

        ``prepare_images(paths)`` builds that batch from files; raw pixels, a path or a wrong shape are refused."""
        self._check_images(images)
        chunks = [
            self.method.encode_images(images[i : i + batch_size].to(self.device)).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks) if chunks else torch.empty(0)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise free texts the way training tokenised reports (each text's sentences, with indices)."""
        from radalign.data.dataset import tokenize_texts

        return tokenize_texts(self.tokenizer, texts, self.max_length)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenize(texts[i : i + batch_size])
            tokens = {k: v.to(self.device) for k, v in tokens.items() if k != "n_sentences"}
            chunks.append(self.method.encode_texts(tokens).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)

    @torch.no_grad()
    def encode_learned_prompts(self, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
        """Class texts ("pleural effusion", "no pneumothorax") through the model's learned prompt context (UMCL)
        -> (N, D) on the CPU; a model without learned prompts says so."""
        encode = getattr(self.method, "encode_learned_prompts", None)
        if encode is None or getattr(self.method, "prompt_learner", None) is None:
            raise ConfigError(
                f"this {self.method.config.method} model has no learned prompts (only UMCL with prompts: learned "
                "has them); use the zero-shot prompts pairs, single, ensemble or custom"
            )
        chunks = [encode(list(texts[i : i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
        return torch.cat(chunks) if chunks else torch.empty(0)


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> the GPU when one is visible, else the CPU (the rule pre-training's accelerator follows too);
    a CUDA device that is not there is an error that says so, not a traceback from deep inside torch."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device {device!r} is not a device name; use auto, cpu, cuda or cuda:N") from err
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r}: no CUDA device is visible on this machine (torch.cuda.is_available() is "
                "False); use --device cpu, or auto to take a GPU only when there is one"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def load(path: str | Path, device: str | torch.device = "cpu") -> Encoder:
    """Load an export folder (``<run>/export``) or a run folder that contains one, onto ``device`` (``auto``: a GPU
    when one is visible)."""
    device = resolve_device(device)
    from safetensors.torch import load_file

    from radalign.data.tokenization import load_tokenizer
    from radalign.methods.registry import build_method
    from radalign.training.export import config_from_export

    folder = Path(path)
    if (folder / "export" / "config.json").is_file():
        folder = folder / "export"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"{path} is not a radalign export: expected config.json and model.safetensors (a run writes them to "
            "<run>/export at the end of training)"
        )
    config = config_from_export(folder)
    if not 0 < config.model.embed_dim <= MAX_EMBED_DIM:
        raise ConfigError(
            f"{folder / 'config.json'}: model.embed_dim = {config.model.embed_dim} is not a plausible embedding size "
            f"(1 to {MAX_EMBED_DIM:,}); the export's config was damaged or edited: export the run again"
        )
    tokenizer = load_tokenizer(folder / "tokenizer", local_only=True) if (folder / "tokenizer").is_dir() else None
    config.model.image.pretrained = None  # the exported weights replace any initialisation
    try:
        method = build_method(config, tokenizer=tokenizer, for_inference=True)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
            raise
        raise ConfigError(f"{folder / 'config.json'}: the model it describes does not fit in memory ({err})") from err
    _check_shapes(folder, method.state_dict())
    state = load_file(folder / "model.safetensors")
    missing, unexpected = method.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("ema.")]:
        raise ConfigError(
            f"{folder}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        # caught here, not as "Input contains NaN" deep inside an evaluation that then writes nothing
        raise ConfigError(
            f"{folder / 'model.safetensors'}: {len(broken)} weight tensors hold NaN or infinite values (e.g. "
            f"{', '.join(broken[:3])}): training diverged or the file is damaged; export from an earlier checkpoint"
        )
    return Encoder(method.to(device), tokenizer, config.loader.max_length)


MAX_EMBED_DIM = 65536  # far above any published model (768-2048); a larger value is a damaged config


def _check_shapes(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """Compare the file's tensor shapes (read from its header, nothing loaded) with the model's."""
    from safetensors import safe_open

    try:
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            stored = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118 - no __iter__
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ConfigError(f"{folder / 'model.safetensors'} is not a readable safetensors file ({err})") from err
    wrong = [f"{key}: {shape} in the file, {tuple(expected[key].shape)} in the model"
             for key, shape in stored.items() if key in expected and tuple(expected[key].shape) != shape]  # fmt: skip
    if wrong:
        raise ConfigError(
            f"{folder}: {len(wrong)} weight tensors have another shape than the model config.json describes ("
            + "; ".join(wrong[:3])
            + "): the two files do not belong together; export the run again"
        )
