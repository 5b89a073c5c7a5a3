"""ImageGrid: the one pixels <-> token-grid rule (the tokenizer's patch, never a literal size)."""
import pytest

from megatron_xomni.data.image_grid import ImageGrid


@pytest.mark.parametrize("h,w,patch,rows,cols", [(384, 256, 16, 24, 16), (64, 48, 16, 4, 3), (448, 224, 14, 32, 16),
                                                 (96, 32, 32, 3, 1)])
def test_grid_of_an_image_size(h, w, patch, rows, cols):
    g = ImageGrid.from_pixels(h, w, patch)
    assert (g.rows, g.cols, g.shape, g.num_tokens) == (rows, cols, (rows, cols), rows * cols)
    assert (g.height, g.width) == (h, w)
    assert ImageGrid.from_tokens(rows, cols, patch) == g


@pytest.mark.parametrize("h,w,patch,fix", [
    (60, 64, 16, "use e.g. 64x64"),      # 60/16 = 3.75 -> 4
    (392, 408, 16, "use e.g. 384x416"),  # ties to the even multiple, like the X-Omni preprocessing rule
    (5, 0, 16, "use e.g. 16x16"),        # never below one patch
    (100, 100, 14, "use e.g. 98x98"),
])
def test_sizes_off_the_grid_name_the_nearest_size(h, w, patch, fix):
    with pytest.raises(ValueError) as e:
        ImageGrid.from_pixels(h, w, patch)
    msg = str(e.value)
    assert msg == f"image size {h}x{w} is not a multiple of the {patch}-pixel token grid: {fix}"
    hint = tuple(int(v) for v in fix.split()[-1].split("x"))
    assert ImageGrid.from_pixels(*hint, patch).height == hint[0]  # the suggestion itself works


def test_bad_patch_and_grid():
    with pytest.raises(ValueError, match="patch=0 must be >= 1"):
        ImageGrid.from_pixels(64, 64, 0)
    with pytest.raises(ValueError, match="must be positive"):
        ImageGrid.from_tokens(0, 4, 16)
    with pytest.raises(ValueError, match=r"^--size 64x50 is not a multiple"):
        ImageGrid.from_pixels(64, 50, 16, what="--size")


def test_fold_tokens_concatenates_each_block_in_raster_order():
    import torch

    from megatron_xomni.data.image_grid import fold_tokens

    grid = ImageGrid.from_pixels(48, 64, 8)  # 6 x 8 codes, odd sizes on purpose
    x = torch.randn(2, grid.num_tokens, 3)
    got = fold_tokens(x, grid, 2)
    coarse = grid.fold(2)
    assert (coarse.rows, coarse.cols, coarse.patch) == (3, 4, 16) and (coarse.height, coarse.width) == (48, 64)
    for r in range(coarse.rows):  # direct: decoder token (r, c) = codes (2r+i, 2c+j) for i, j in raster order
        for c in range(coarse.cols):
            want = torch.cat([x[:, (2 * r + i) * grid.cols + 2 * c + j] for i in range(2) for j in range(2)], dim=-1)
            torch.testing.assert_close(got[:, r * coarse.cols + c], want, rtol=0, atol=0)
    assert fold_tokens(x, grid, 1) is x
    with pytest.raises(ValueError, match="cannot fold the 6x8 token grid into 4x4 blocks"):
        grid.fold(4)
