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
