"""Image encoders that fill the output contract: timm 2D backbones (any timm name) and MONAI 3D ResNets.

Radiographs and CT are grey, so encoders take 1 channel by default. RGB weights become 1-channel weights by
summing the stem over its RGB input dimension (as PRIOR does): a grey image x then gives exactly the output the
RGB network gives for (x, x, x). Weights come only from a local file the user names, or from a hub name the user
asks for explicitly (``"timm"``, ``"timm:TAG"``, ``"hf-hub:ORG/NAME"``); nothing is ever downloaded implicitly.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from radalign.errors import ConfigError
from radalign.models.outputs import ImageOutput, full_mask

MONAI_RESNETS = ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200")


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` or torch file (``state_dict`` / ``model`` nesting and DDP's
    ``module.`` prefix removed), read without executing pickled code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights file {path} does not exist; pass a local .safetensors/.pt file (timm encoders also "
            "take 'timm', 'timm:TAG' or 'hf-hub:ORG/NAME' to download hub weights)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for a file that is not a weights-only checkpoint
            raise ConfigError(f"could not read weights from {path}: {err}") from err
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_into(model: nn.Module, state: dict[str, Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``model`` strictly (so a wrong file is an error, not a silent random init), except that
    classifier keys (``ignore_prefixes``) are dropped and 3-channel stem weights are summed to 1 channel."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not any(k.startswith(p + ".") for p in ignore_prefixes)}
    for key, value in list(state.items()):
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        rgb_to_grey = value.ndim == target.ndim >= 3 and value.shape[1] == 3 and target.shape[1] == 1
        if rgb_to_grey and value.shape[0] == target.shape[0] and value.shape[2:] == target.shape[2:]:
            state[key] = value.sum(dim=1, keepdim=True)  # RGB stem -> grey stem
            continue
        raise ConfigError(
            f"{source}: weight {key!r} has shape {tuple(value.shape)} but the model expects {tuple(target.shape)}; "
            "the file is for another architecture or size"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ConfigError(
            f"{source} does not match the model: {len(missing)} missing keys {missing[:5]}, "
            f"{len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:5]}; pass weights saved "
            "from this architecture (a plain state dict, keys as in model.state_dict())"
        )


def _hub_request(pretrained: str | Path | None) -> str | None:
    """'timm' / 'timm:TAG' / 'hf-hub:ORG/NAME' when the user explicitly asked for hub weights, else None."""
    text = str(pretrained) if pretrained is not None else ""
    return text if text == "timm" or text.startswith(("timm:", "hf-hub:")) else None


class TimmImageEncoder(nn.Module):
    """Any timm 2D backbone -> :class:`ImageOutput`.

    CNNs (and other models whose features form a map): local = the final feature map flattened (h*w cells),
    global = its average. ViTs: local = the patch tokens, global = [CLS] (the patch mean when the model has no
    class token), attention = [CLS] -> patch attention of the last block averaged over heads and renormalised
    over patches (MGCA weights its token loss with it). ``image_size`` sets a ViT's ``img_size``.
    """

    def __init__(
        self,
        name: str = "resnet18",
        in_chans: int = 1,
        pretrained: str | Path | None = None,
        image_size: int | tuple[int, int] | None = None,
        **timm_kwargs: Any,
    ) -> None:
        super().__init__()
        import timm

        self.name = name
        self.in_chans = in_chans
        kwargs = {"in_chans": in_chans, "num_classes": 0, "global_pool": "", **timm_kwargs}
        if image_size is not None:
            kwargs.setdefault("img_size", image_size)
        hub = _hub_request(pretrained)
        model_name = name
        if hub is not None:
            model_name = hub if hub.startswith("hf-hub:") else name + hub.removeprefix("timm").replace(":", ".", 1)
        try:
            self.model = self._create(timm, model_name, hub is not None, kwargs, image_size is not None)
        except (RuntimeError, OSError, ValueError) as err:  # unknown timm name; hub weights not reachable
            raise ConfigError(
                f"image encoder {model_name!r}: {err} (names: timm.list_models(); hub weights need network)"
            ) from err
        if pretrained is not None and hub is None:
            self._load_file(pretrained)
        self.num_prefix_tokens = int(getattr(self.model, "num_prefix_tokens", 0))
        self.out_dim = int(self.model.num_features)
        self.pyramid_channels, self.pyramid_strides = _pyramid_levels(self.model)
        self._last_block_input: Tensor | None = None
        self._attn_block = self._find_attention_block()
        if self._attn_block is not None:
            self._attn_block.register_forward_pre_hook(self._keep_block_input)

    @property
    def is_vision_transformer(self) -> bool:
        """True for patch-token transformers (ViT family), False for CNNs: methods whose official code branches on
        the encoder family (MGCA's token loss) read it."""
        return hasattr(self.model, "patch_embed") and hasattr(self.model, "blocks")

    @staticmethod
    def _create(timm: Any, name: str, pretrained: bool, kwargs: dict[str, Any], size_given: bool) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError:
            if not size_given:
                raise
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}  # CNNs take any size: no img_size
            return timm.create_model(name, pretrained=pretrained, **kwargs)

    def _load_file(self, path: str | Path) -> None:
        state = load_weights_file(path)
        filter_fn = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's own key remapping and position-embedding resampling for this family
            state = filter_fn(state, self.model)
        classifier = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier") or ()
        prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_into(self.model, state, f"weights file {path}", ignore_prefixes=prefixes)

    def _find_attention_block(self) -> nn.Module | None:
        """The last transformer block when its attention is timm's plain q.k softmax (then recomputable)."""
        from timm.layers import Attention

        blocks = getattr(self.model, "blocks", None)
        if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
            return None
        block = blocks[-1]
        ok = isinstance(getattr(block, "attn", None), Attention) and hasattr(block, "norm1")
        return block if ok and getattr(self.model, "has_class_token", False) else None

    def _keep_block_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._last_block_input = args[0]

    def _cls_attention(self) -> Tensor | None:
        """[CLS] -> patch attention of the last block, from its own qkv projection (B, N_patches)."""
        x, self._last_block_input = self._last_block_input, None
        if x is None or self._attn_block is None:
            return None
        attn = self._attn_block.attn
        h = self._attn_block.norm1(x)
        b, n, _ = h.shape
        heads = attn.num_heads
        head_dim = attn.qkv.out_features // 3 // heads
        qkv = attn.qkv(h).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        q, k = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])  # the [CLS] query only
        scores = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
        weights = scores.softmax(dim=-1).mean(dim=1)[:, 0, self.num_prefix_tokens :]  # (B, N_patches)
        return weights / weights.sum(dim=-1, keepdim=True)

    def _grid(self, n: int, size: tuple[int, int]) -> tuple[int, int]:
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            grid = tuple(int(g) for g in patch_embed.dynamic_feat_size(size))
            if grid[0] * grid[1] == n:
                return grid  # type: ignore[return-value]
        side = round(n**0.5)
        return (side, side) if side * side == n else (1, n)

    def pyramid(self, images: Tensor) -> list[Tensor]:
        """Feature maps, fine to coarse, for dense heads: (B, C_i, H / s_i, W / s_i) with C_i, s_i in
        ``pyramid_channels`` / ``pyramid_strides``. ViTs give one map: the final (normed) patch tokens on their grid."""
        if not self.pyramid_strides or not hasattr(self.model, "forward_intermediates"):
            raise ConfigError(
                f"image encoder {self.name}: timm gives no feature pyramid for it (no feature_info / "
                "forward_intermediates); use a timm CNN or ViT for segmentation and detection"
            )
        single = len(self.pyramid_strides) == 1
        # norm only for single-scale models: their last map then equals forward()'s local tokens
        maps = self.model.forward_intermediates(
            images, indices=len(self.pyramid_strides), norm=single, intermediates_only=True
        )
        self._last_block_input = None  # the ViT attention hook fired: drop its input rather than hold it
        return list(maps)

    def forward(self, images: Tensor) -> ImageOutput:
        """images (B, C, H, W) -> global (B, D), local (B, N, D), grid (h, w), [CLS] attention for ViTs."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ConfigError(
                f"image encoder {self.name} expects (B, {self.in_chans}, H, W) images, got {tuple(images.shape)}; "
                "use a 3D encoder (name ending in _3d) for volumes, or set in_chans"
            )
        features = self.model.forward_features(images)
        b = images.shape[0]
        if features.ndim == 4:  # a feature map: NCHW, or NHWC for models that declare it (Swin, ...)
            if getattr(self.model, "output_fmt", "NCHW") == "NHWC":
                features = features.permute(0, 3, 1, 2)
            grid = (features.shape[2], features.shape[3])
            local = features.flatten(2).transpose(1, 2)  # (B, h*w, D)
            return ImageOutput(local.mean(dim=1), local, full_mask(b, local.shape[1], local.device), grid)
        if features.ndim != 3:
            raise ConfigError(f"image encoder {self.name}: unsupported feature shape {tuple(features.shape)}")
        local = features[:, self.num_prefix_tokens :]  # (B, N, D) patch tokens
        has_cls = getattr(self.model, "has_class_token", False)
        global_emb = features[:, 0] if has_cls else local.mean(dim=1)
        attention = self._cls_attention()
        grid = self._grid(local.shape[1], (images.shape[2], images.shape[3]))
        return ImageOutput(global_emb, local, full_mask(b, local.shape[1], local.device), grid, attention)


def _pyramid_levels(model: nn.Module) -> tuple[list[int], list[int]]:
    """(channels, strides) of a timm model's feature levels; a model whose levels share one stride (a ViT's
    blocks) has one level, its last block."""
    info = getattr(model, "feature_info", None)
    if not info or not isinstance(info, list) or not all(isinstance(i, dict) and "reduction" in i for i in info):
        return [], []
    if len({int(i["reduction"]) for i in info}) == 1:
        info = info[-1:]
    return [int(i["num_chs"]) for i in info], [int(i["reduction"]) for i in info]


class Volume3DEncoder(nn.Module):
    """A MONAI 3D ResNet for CT volumes (B, 1, D, H, W) -> :class:`ImageOutput` with a (d, h, w) grid.

    Features are taken before MONAI's pooling: local = the last feature map flattened, global = its average, so
    CLIP-style objectives run on volume-report pairs exactly as on radiographs. MONAI's default stem (stride 1,
    then max-pool) downsamples by 16: a 64^3 volume gives a 4x4x4 grid.
    """

    def __init__(
        self, name: str = "resnet18", in_chans: int = 1, pretrained: str | Path | None = None, **monai_kwargs: Any
    ) -> None:
        super().__init__()
        from monai.networks import nets

        if name not in MONAI_RESNETS:
            raise ConfigError(f"3D image encoder: unknown name {name!r}; choose one of {list(MONAI_RESNETS)}")
        if _hub_request(pretrained) is not None:
            raise ConfigError("3D image encoder: hub weights are not supported; pass a local weights file")
        self.name = name
        self.in_chans = in_chans
        kwargs = {"spatial_dims": 3, "n_input_channels": in_chans, "feed_forward": False, **monai_kwargs}
        self.model = getattr(nets, name)(**kwargs)
        self.model.avgpool = nn.Identity()  # unused: pooling happens here, after the local features are kept
        if pretrained is not None:
            load_into(self.model, load_weights_file(pretrained), f"weights file {pretrained}", ignore_prefixes=("fc",))
        self.out_dim = int(self.model.in_planes)

    def forward(self, volumes: Tensor) -> ImageOutput:
        """volumes (B, C, D, H, W) -> global (B, F), local (B, d*h*w, F), grid (d, h, w)."""
        if volumes.ndim != 5 or volumes.shape[1] != self.in_chans:
            raise ConfigError(
                f"3D image encoder {self.name} expects (B, {self.in_chans}, D, H, W) volumes, "
                f"got {tuple(volumes.shape)}; use a 2D encoder for radiographs"
            )
        m = self.model
        x = m.act(m.bn1(m.conv1(volumes)))
        if not m.no_max_pool:
            x = m.maxpool(x)
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, F, d, h, w)
        grid = tuple(int(s) for s in x.shape[2:])
        local = x.flatten(2).transpose(1, 2)  # (B, d*h*w, F)
        return ImageOutput(local.mean(dim=1), local, full_mask(x.shape[0], local.shape[1], x.device), grid)


def build_image_encoder(config: Mapping[str, Any] | Any) -> TimmImageEncoder | Volume3DEncoder:
    """An image encoder from ``{"name", "pretrained", "kwargs", ...}`` (a dict or a config dataclass).

    A name ending in ``_3d`` (``resnet18_3d``), or ``spatial_dims: 3``, selects the MONAI 3D ResNet; any other
    name is a timm model. Keys besides name / pretrained / kwargs are passed to the encoder too.
    """
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    name = str(cfg.pop("name", "resnet18"))
    pretrained = cfg.pop("pretrained", None)
    kwargs = {**(cfg.pop("kwargs", None) or {}), **cfg}
    spatial_dims = int(kwargs.pop("spatial_dims", 3 if name.endswith("_3d") else 2))
    if spatial_dims == 3:
        return Volume3DEncoder(name.removesuffix("_3d"), pretrained=pretrained, **kwargs)
    if spatial_dims != 2:
        raise ConfigError(f"image encoder {name!r}: spatial_dims must be 2 or 3, got {spatial_dims}")
    return TimmImageEncoder(name, pretrained=pretrained, **kwargs)
