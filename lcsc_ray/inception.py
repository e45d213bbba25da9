"""Standard FID features: pytorch-fid's InceptionV3 (pool3, 2048-d), built without torchvision.

The built-in feature network for standard FID (`fid.features.target: lcsc_ray.inception:fid_inception_v3`).
The architecture and parameter names match torchvision's Inception3 with pytorch-fid's FID blocks (average
pools that ignore padding in Mixed_5*, Mixed_6b-e and Mixed_7b, a max pool in Mixed_7c), so the state dict of
`pt_inception-2015-12-05-6726825d.pth` loads as is. Nothing is downloaded: the user gives the weights file
(local path, file:// or s3://); its sha256 is printed, and checked against `sha256` when given.

Input handling follows pytorch-fid on image files: images in [-1, 1] are mapped to [0, 1], quantised to uint8
levels as a saved PNG is (`quantize`, on by default, as pytorch-fid and clean-fid see them), grayscale is
repeated to 3 channels, then resized bilinearly to 299x299 and scaled to [-1, 1].
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from lcsc_ray import checkpoint_formats
from rayops import storage
from schemas.errors import CheckpointError, LcscCheckfreeError, StorageNotFoundError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""

    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool ignores the zero padding (pytorch-fid's patch)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (FID variant)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat(
            [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl, self.branch_pool(_avg3(x))], 1
        )


class InceptionB(nn.Module):
    """35 -> 17 reduction block."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (FID variant)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        h, v = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **h)
        self.branch7x7_3 = BasicConv2d(c7, 192, **v)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **h)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **v)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **h)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = layer(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction block."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat(
            [self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1
        )


class InceptionE(nn.Module):
    """8x8 block; the first (FID) uses an average pool without padding, the second a max pool."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, dbl, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 up to pool3: images (B, C, H, W) in [-1, 1] -> features (B, 2048)."""

    def __init__(self, quantize: bool = True):
        super().__init__()
        self.quantize = quantize
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = (
            InceptionA(192, 32),
            InceptionA(256, 64),
            InceptionA(288, 64),
        )
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the 2015 TF graph's 1008 classes; unused for pool3 features

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the network's input (B, 3, 299, 299) in [-1, 1], as pytorch-fid prepares files."""
        x = (images.float().clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1], what a PNG reader gives
        if self.quantize:
            x = torch.round(x * 255) / 255  # uint8 levels (pytorch-fid and clean-fid read uint8 images)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)  # grayscale -> RGB
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # (B, 3, 299, 299)
        return 2 * x - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(self.prepare(images))))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)  # ends (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)


WEIGHTS_FIELD = "fid.features.kwargs.weights_uri"
SHA256_FIELD = "fid.features.kwargs.sha256"


def read_weights(weights_uri: str, sha256: str | None = None) -> bytes:
    """The weights file's bytes; its sha256 is printed and, when `sha256` is given, must match."""
    try:
        data = storage.read_bytes(weights_uri)
    except StorageNotFoundError:
        raise LcscCheckfreeError(
            f"FID Inception weights {weights_uri} not found; nothing is downloaded here: fetch "
            f"{FID_WEIGHTS_NAME} (pytorch-fid's release) yourself and pass its path as `weights_uri`"
        ) from None
    digest = hashlib.sha256(data).hexdigest()
    print(f"FID Inception weights {weights_uri}: sha256 {digest}", flush=True)
    if sha256 is not None and digest != sha256.strip().lower():
        raise CheckpointError(
            f"FID Inception weights {weights_uri} have sha256 {digest}, but `{SHA256_FIELD}` expects {sha256}; "
            f"the file is not the one the spec names: replace it, or fix `{SHA256_FIELD}`"
        )
    return data


def load_weights(model: FIDInceptionV3, weights_uri: str, sha256: str | None = None) -> FIDInceptionV3:
    """Load a pytorch-fid state dict (weights_only) into `model`; only BatchNorm counters may be missing."""
    field = WEIGHTS_FIELD
    state = checkpoint_formats.load_torch(read_weights(weights_uri, sha256), weights_uri, field)
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{weights_uri} holds a {type(state).__name__}, not an FID Inception state dict "
            f"(listed by `{field}`)"
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as exc:  # wrong shapes or non-tensor values
        problem = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"{weights_uri} is not an FID Inception state dict ({problem}) (listed by `{field}`)"
        ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise LcscCheckfreeError(
            f"{weights_uri} is not an FID Inception state dict: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model


def fid_inception_v3(weights_uri: str, sha256: str | None = None, quantize: bool = True) -> nn.Module:
    """Features plug-in for standard FID: pytorch-fid's InceptionV3 (pool3, 2048-d) from the weights file the
    user provides (`pt_inception-2015-12-05-6726825d.pth`; local, file:// or s3://), its sha256 checked when
    given; `quantize` rounds inputs to uint8 levels as pytorch-fid and clean-fid see image files."""
    return load_weights(FIDInceptionV3(quantize=quantize), weights_uri, sha256).eval()
