"""attention_volume's two modes (issue 15): the backbone once over the whole CT + the semantic attention
per window of tokens ("whole") against the whole network per window ("sliding"); and the compact,
scaled storage of the maps."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from smartformer.analysis.attention import AttentionResult, attention_volume, write_attention
from smartformer.data.phantom import generate_phantom
from smartformer.models.smartformer import SMARTFormer


def _volume(shape, seed: int = 0, spacing: float = 2.0) -> MetaTensor:
    g = torch.Generator().manual_seed(seed)
    return MetaTensor(
        torch.rand(1, *shape, generator=g) * 1000 - 500,
        affine=torch.diag(torch.tensor([spacing, spacing, spacing, 1.0])),
    )


@pytest.fixture(scope="module")
def tiny() -> SMARTFormer:
    torch.manual_seed(0)
    return SMARTFormer.from_preset("tiny", heads=False, decoder=False).eval()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shape,roi", [((32, 32, 32), 32), ((64, 64, 64), 64), ((64, 32, 64), (64, 32, 64))])
def test_whole_equals_sliding_on_one_roi(tiny, shape, roi):
    """A volume of exactly one ROI is one window either way: the same network on the same voxels."""
    volume = _volume(shape)
    sliding = attention_volume(tiny, volume, roi=roi, mode="sliding")
    whole = attention_volume(tiny, volume, roi=roi, mode="whole")
    np.testing.assert_allclose(whole.heads, sliding.heads, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(whole.mean, sliding.mean, rtol=1e-4, atol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_whole_maps_are_relative_to_each_window_like_sliding(tiny):
    """On several windows each mode keeps the 'uniform = 1' scale and the maps have the CT's shape;
    a semantic attention that ignores its input gives identical blends in both modes."""
    volume = _volume((80, 40, 70))
    whole = attention_volume(tiny, volume, roi=32, mode="whole")
    sliding = attention_volume(tiny, volume, roi=32, mode="sliding")
    assert whole.heads.shape == sliding.heads.shape == (6, 80, 40, 70)
    assert whole.mean.mean() == pytest.approx(1.0, rel=0.05)
    # every window's map uniform (all-zero keys): both modes blend windows of exactly 1.0
    flat = SMARTFormer.from_preset("tiny", heads=False, decoder=False).eval()
    flat.load_state_dict(tiny.state_dict())
    for block in flat.semantic.blocks:
        torch.nn.init.zeros_(block.attn.kv.weight)
        torch.nn.init.zeros_(block.attn.kv.bias)
    for mode in ("whole", "sliding"):
        np.testing.assert_allclose(attention_volume(flat, volume, roi=32, mode=mode).mean, 1.0, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_whole_close_to_sliding_on_a_phantom_ct():
    """Where windows overlap the modes differ only by the context the tokens see (the real neighbours
    instead of zero padding at a window's edge): the shipped model's maps still correlate closely."""
    p = generate_phantom(0, shape=(80, 64, 48), spacing=(4.0, 4.0, 4.0))
    ct = MetaTensor(torch.from_numpy(p.ct.astype(np.float32))[None], affine=torch.from_numpy(p.affine))
    model = SMARTFormer.from_pretrained("smart-tiny-ct")
    maps = {mode: attention_volume(model, ct, spacing=4.0, roi=64, mode=mode).mean for mode in ("whole", "sliding")}
    assert np.corrcoef(maps["whole"].ravel(), maps["sliding"].ravel())[0, 1] > 0.9


def test_modes_refused_where_they_cannot_run(tiny):
    with pytest.raises(ValueError, match="mode"):
        attention_volume(tiny, _volume((32, 32, 32)), roi=32, mode="fast")
    vit = SMARTFormer.from_preset("vit_tiny", heads=False, decoder=False)
    with pytest.raises(Exception, match="Swin"):
        vit.semantic_input(torch.zeros(1, 1, 32, 32, 32))


def test_semantic_input_is_what_forward_features_feeds_the_semantic_attention(tiny):
    x = torch.rand(1, 1, 64, 64, 32)
    maps = tiny.token_attention_maps(tiny.semantic_input(x))
    torch.testing.assert_close(maps, tiny.attention_maps(x))


def test_mean_map_stored_16_bit_with_its_scale_in_the_header(tmp_path):
    """The mean map is uint16 with scl_slope: nibabel reads true values back within half a step."""
    rng = np.random.default_rng(0)
    mean = (rng.random((20, 16, 12)) * 3.7).astype(np.float32)
    heads = rng.random((3, 20, 16, 12)).astype(np.float32)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    result = AttentionResult(heads=heads, mean=mean, image_hu=np.zeros(mean.shape, np.float32), affine=affine)
    files = write_attention(result, tmp_path, stem="case")
    img = nib.load(str(files["mean"]))
    assert img.get_data_dtype() == np.uint16
    slope, inter = img.dataobj.slope, img.dataobj.inter  # the file's scl_slope / scl_inter
    assert inter == 0.0 and slope == pytest.approx(mean.max() / 65535, rel=1e-6)
    back = img.get_fdata()
    assert np.abs(back - mean).max() <= 0.51 * slope  # half a step, + float32 rounding
    np.testing.assert_allclose(img.affine, affine)
    assert nib.load(str(files["heads"])).get_data_dtype() == np.uint8


@pytest.mark.parametrize(
    "grid,ws,ss",
    [
        ((8, 8, 8), (4, 4, 4), (2, 2, 2)),
        ((14, 21, 7), (7, 7, 7), (3, 3, 3)),
        ((8, 8, 4), (4, 4, 4), (2, 2, 0)),
        ((12, 4, 8), (4, 4, 4), (2, 0, 2)),
    ],
)
def test_shift_mask_equals_the_region_painting_definition(grid, ws, ss):
    """The whole-volume pass builds the shifted-window mask for a whole CT (1.5 GB for elastix_00):
    it is built in one pass, and must equal Swin's definition (paint the 27 regions, compare labels)."""
    import itertools

    from smartformer.models.swin3d import _shift_mask, _window_partition

    img = torch.zeros((1, *grid, 1))
    slices = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(ws, ss)]
    for cnt, (sd, sh, sw) in enumerate(itertools.product(*slices)):
        img[:, sd, sh, sw, :] = cnt
    win = _window_partition(img, ws).squeeze(-1)
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    expected = diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)
    assert torch.equal(_shift_mask(grid, ws, ss, torch.device("cpu")), expected)
