import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from vlmdrop.ops.tiles import (
    patch_ids,
    pool_patch_features,
    pool_patch_scores,
    shuffle_source_map,
    to_raster,
)


def _blocks(side: int, f: int) -> list[list[int]]:
    """Brute force: the f x f block of patch ids under each post-shuffle token, raster order."""
    n = side // f
    return [sorted((f * i + a) * side + f * j + b for a in range(f) for b in range(f))
            for i in range(n) for j in range(n)]


@pytest.mark.parametrize("side,scale", [(4, 0.5), (8, 0.5), (6, 0.5), (8, 0.25)])
def test_shuffle_source_map_is_the_block_of_each_token(side, scale):
    shuffled = InternVLModel.pixel_shuffle(None, patch_ids(side, side), scale_factor=scale)  # the model's own
    sources, local, hw = shuffle_source_map(shuffled, patch_hw=(side, side))
    f = round(1 / scale)
    assert hw == (side // f, side // f) and sources.shape == (hw[0] * hw[1], f * f)
    by_raster = [None] * sources.shape[0]
    for t in range(sources.shape[0]):
        by_raster[int(local[t])] = sorted(sources[t].tolist())
    assert by_raster == _blocks(side, f)


def test_pooling_and_raster_against_brute_force():
    side, f = 6, 2
    shuffled = InternVLModel.pixel_shuffle(None, patch_ids(side, side), scale_factor=0.5)
    sources, local, _ = shuffle_source_map(shuffled, patch_hw=(side, side))
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 3, side * side, generator=g, dtype=torch.float64)  # (T, H, P)
    feats = torch.randn(2, side * side, 5, generator=g, dtype=torch.float64)  # (T, P, C)
    blocks = _blocks(side, f)
    want_s = torch.stack([scores[..., b].sum(-1) for b in blocks], -1)  # (T, H, N')
    want_f = torch.stack([feats[:, b].mean(1) for b in blocks], 1)  # (T, N', C)
    torch.testing.assert_close(pool_patch_scores(scores, sources, local), want_s, rtol=0, atol=1e-12)
    torch.testing.assert_close(pool_patch_features(feats, sources, local), want_f, rtol=0, atol=1e-12)
    by_token = torch.randn(2, local.numel(), 4, generator=g)  # (T, N', X) feature order
    out = to_raster(by_token, local)
    for t in range(local.numel()):
        assert torch.equal(out[:, int(local[t])], by_token[:, t])


def test_shuffle_source_map_errors_carry_values():
    with pytest.raises(ValueError, match=r"\(1, h', w', k\), got \(4, 4\)"):
        shuffle_source_map(torch.zeros(4, 4), patch_hw=(4, 4))
    with pytest.raises(ValueError, match=r"\[0, 20\], outside the 4x4"):
        shuffle_source_map(torch.tensor([0.0, 1, 2, 20]).reshape(1, 1, 1, 4), patch_hw=(4, 4))
    with pytest.raises(ValueError, match="not a permutation of the 2x1 grid"):
        shuffle_source_map(torch.tensor([0.0, 1, 4, 5, 0, 1, 4, 5]).reshape(1, 2, 1, 4), patch_hw=(4, 4))
    with pytest.raises(ValueError, match="0x3"):
        patch_ids(0, 3)
