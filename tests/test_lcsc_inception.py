"""FID InceptionV3 wiring with random weights (the real weights cannot be fetched here)."""

from __future__ import annotations

import pytest
import torch

from lcsc_ray.inception import FIDInceptionV3, fid_inception_v3
from schemas.errors import LcscCheckfreeError


def test_inception_state_dict_roundtrip_and_pool3_shape(tmp_path):
    """Saved weights load back through the plug-in; features are (B, 2048); keys are pytorch-fid's."""
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    keys = list(model.state_dict())
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in keys and "fc.weight" in keys
    assert (
        sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2049
    )  # torchvision Inception3 without aux (1000 classes) + 8 classes
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "w.pth")
    loaded = fid_inception_v3(weights_uri=str(tmp_path / "w.pth"))
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.inference_mode():
        a, b = model(images), loaded(images)
    assert a.shape == (2, 2048)
    torch.testing.assert_close(a, b)


def test_inception_missing_weights_is_clear(tmp_path):
    """A missing weights file names the file and says nothing is downloaded."""
    with pytest.raises(LcscCheckfreeError, match=r"nope\.pth not found; nothing is downloaded"):
        fid_inception_v3(weights_uri=str(tmp_path / "nope.pth"))


# ---------------------------------------------------------------------------------------------------------
# pytorch-fid's own module, with torchvision stubbed ONLY here (torchvision does not import beside this torch).
# The stub transcribes torchvision's Inception3 layer constructors and its InceptionB/InceptionD forwards;
# everything FID-specific (pytorch-fid's patched blocks, block order, pools, resize, input scaling) is
# pytorch-fid's code, and a strict load of our state dict checks every name and shape of the stub.


class _TvConv(torch.nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = torch.nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return torch.nn.functional.relu(self.bn(self.conv(x)), inplace=True)


class _TvA(torch.nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = _TvConv(cin, 64, kernel_size=1)
        self.branch5x5_1, self.branch5x5_2 = (
            _TvConv(cin, 48, kernel_size=1),
            _TvConv(48, 64, kernel_size=5, padding=2),
        )
        self.branch3x3dbl_1 = _TvConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _TvConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _TvConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _TvConv(cin, pool_features, kernel_size=1)


class _TvB(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = _TvConv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _TvConv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _TvConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _TvConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat(
            [self.branch3x3(x), dbl, torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1
        )


class _TvC(torch.nn.Module):
    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7, h, v = (
            channels_7x7,
            {"kernel_size": (1, 7), "padding": (0, 3)},
            {"kernel_size": (7, 1), "padding": (3, 0)},
        )
        self.branch1x1 = _TvConv(cin, 192, kernel_size=1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = (
            _TvConv(cin, c7, kernel_size=1),
            _TvConv(c7, c7, **h),
            _TvConv(c7, 192, **v),
        )
        self.branch7x7dbl_1, self.branch7x7dbl_2 = _TvConv(cin, c7, kernel_size=1), _TvConv(c7, c7, **v)
        self.branch7x7dbl_3, self.branch7x7dbl_4 = _TvConv(c7, c7, **h), _TvConv(c7, c7, **v)
        self.branch7x7dbl_5 = _TvConv(c7, 192, **h)
        self.branch_pool = _TvConv(cin, 192, kernel_size=1)


class _TvD(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = (
            _TvConv(cin, 192, kernel_size=1),
            _TvConv(192, 320, kernel_size=3, stride=2),
        )
        self.branch7x7x3_1 = _TvConv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _TvConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _TvConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _TvConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, torch.nn.functional.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _TvE(torch.nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = _TvConv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _TvConv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _TvConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _TvConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _TvConv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _TvConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _TvConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _TvConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _TvConv(cin, 192, kernel_size=1)


class _TvInception3(torch.nn.Module):
    def __init__(self, num_classes=1000, aux_logits=True, init_weights=None, **_):
        super().__init__()
        assert not aux_logits
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = (
            _TvConv(3, 32, kernel_size=3, stride=2),
            _TvConv(32, 32, kernel_size=3),
        )
        self.Conv2d_2b_3x3 = _TvConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = (
            _TvConv(64, 80, kernel_size=1),
            _TvConv(80, 192, kernel_size=3),
        )
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _TvA(192, 32), _TvA(256, 64), _TvA(288, 64)
        self.Mixed_6a = _TvB(288)
        self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e = (
            _TvC(768, 128),
            _TvC(768, 160),
            _TvC(768, 160),
            _TvC(768, 192),
        )
        self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = _TvD(768), _TvE(1280), _TvE(2048)
        self.fc = torch.nn.Linear(2048, num_classes)


@pytest.fixture
def pytorch_fid_inception(monkeypatch):
    """pytorch-fid's inception module imported over a torchvision stub that lives only for this test."""
    import importlib
    import sys
    import types

    pytest.importorskip(
        "pytorch_fid", reason="pytorch-fid (pip install --no-deps pytorch-fid) is a test extra"
    )
    inception = types.SimpleNamespace(InceptionA=_TvA, InceptionC=_TvC, InceptionE=_TvE, BasicConv2d=_TvConv)
    models = types.ModuleType("torchvision.models")
    models.inception, models.inception_v3 = inception, _TvInception3
    torchvision = types.ModuleType("torchvision")
    torchvision.__version__, torchvision.models = "0.21.0", models
    for name, module in (("torchvision", torchvision), ("torchvision.models", models)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "pytorch_fid.inception", raising=False)
    module = importlib.import_module("pytorch_fid.inception")
    yield module
    sys.modules.pop("pytorch_fid.inception", None)  # nothing outside this test sees the stubbed import


def _random_fid_weights() -> dict[str, torch.Tensor]:
    """Seeded random weights with BatchNorm statistics that are not the identity (so scaling bugs show)."""
    torch.manual_seed(3)
    model = FIDInceptionV3()
    generator = torch.Generator().manual_seed(4)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("conv.weight"):  # He init keeps the signal alive through ~90 layers
            fan_in = value[0].numel()
            value = torch.randn(value.shape, generator=generator) * (2 / fan_in) ** 0.5
        elif name.endswith("running_mean"):
            value = torch.randn(value.shape, generator=generator) * 0.1
        elif name.endswith("running_var"):
            value = torch.rand(value.shape, generator=generator) + 0.5
        elif name.endswith("bn.weight"):
            value = torch.rand(value.shape, generator=generator) * 0.4 + 0.8
        if not name.endswith("num_batches_tracked"):
            state[name] = value.clone()
    return state


def test_features_match_pytorch_fid_module(pytorch_fid_inception, monkeypatch, tmp_path):
    """Same random weights: our pool3 features equal pytorch-fid's InceptionV3 to 1e-5, gray and quantised too."""
    state = _random_fid_weights()
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url", lambda *a, **k: state)
    theirs = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    torch.save(state, tmp_path / "fid.pth")
    exact = fid_inception_v3(weights_uri=str(tmp_path / "fid.pth"), quantize=False)
    quantised = fid_inception_v3(weights_uri=str(tmp_path / "fid.pth"))
    generator = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
    gray = torch.rand(1, 1, 28, 28, generator=generator) * 2 - 1
    with torch.inference_mode():
        reference = theirs((rgb + 1) / 2)[0].flatten(1)  # pytorch-fid takes [0, 1]
        ours = exact(rgb)
        assert ours.shape == (2, 2048)
        spread = float((reference[0] - reference[1]).abs().max())
        assert spread > 1e-2 * float(reference.abs().max()) > 0  # features depend on the image
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            exact(gray), theirs(((gray + 1) / 2).repeat(1, 3, 1, 1))[0].flatten(1), rtol=0, atol=1e-5
        )
        as_png = torch.round((rgb + 1) / 2 * 255) / 255  # what pytorch-fid reads back from a saved PNG
        torch.testing.assert_close(quantised(rgb), theirs(as_png)[0].flatten(1), rtol=0, atol=1e-5)
        assert not torch.allclose(quantised(rgb), ours, rtol=0, atol=1e-6)  # quantisation really happens


def test_weights_sha256_printed_and_checked(tmp_path, capsys):
    """The weights' sha256 is printed; a different expected sha256 is refused naming the file and the field."""
    import hashlib

    from schemas.errors import CheckpointError

    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fid_inception_v3(weights_uri=str(path), sha256=digest.upper())
    assert f"sha256 {digest}" in capsys.readouterr().out
    with pytest.raises(
        CheckpointError, match=r"w\.pth have sha256 .* `fid\.features\.kwargs\.sha256` expects 00"
    ):
        fid_inception_v3(weights_uri=str(path), sha256="00" * 32)


def test_pytorch_fid_npz_is_a_reference(tmp_path):
    """A pytorch-fid stats file (savez_compressed, float32 mu, float64 sigma) loads as the reference."""
    import numpy as np

    from lcsc_ray.fid import load_reference_stats

    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 2048)).astype(np.float32)
    mu, sigma = (
        np.mean(features, axis=0),
        np.cov(features, rowvar=False),
    )  # pytorch-fid's calculate_activation_statistics
    np.savez_compressed(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    loaded_mu, loaded_sigma = load_reference_stats(str(tmp_path / "stats.npz"))
    assert loaded_mu.dtype == np.float64 and loaded_sigma.shape == (2048, 2048)
    np.testing.assert_array_equal(loaded_mu, mu.astype(np.float64))
    np.testing.assert_array_equal(loaded_sigma, sigma)
