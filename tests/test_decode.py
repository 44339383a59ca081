"""Decoding as a user's files really are: each variant decodes to what an image viewer shows, never
silently altered (camera orientation, 16-bit grey, CMYK, palette transparency, animation), and the
rule for a non-image file in a class folder."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from tl.data.decode import decode_image
from tl.data.sources import load_image_folder
from tl.errors import DataError


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def _rgb(x: np.ndarray) -> np.ndarray:
    """Decoded 3 x H x W in [0, 1] -> H x W x 3 in 0..255."""
    return (x.transpose(1, 2, 0) * 255).round()


def test_a_camera_jpeg_is_turned_as_its_exif_orientation_says():
    img = np.zeros((10, 20, 3), np.uint8)  # stored landscape: red left half, blue right half
    img[:, :10] = (255, 0, 0)
    img[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = _rgb(decode_image(_bytes(Image.fromarray(img), "JPEG", exif=exif, quality=95), (20, 10)))
    assert out.shape == (20, 10, 3), "displayed portrait, as a viewer shows it"
    top, bottom = out[:8].mean((0, 1)), out[12:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (top, bottom)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped_white(fmt):
    a = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (4, 1))
    im = Image.fromarray(a)
    assert im.mode.startswith("I;16")
    out = _rgb(decode_image(_bytes(im, fmt), (4, 16)))
    assert np.allclose(out[..., 0], np.round(a / 257.0), atol=1) and (out[..., 0] == out[..., 2]).all()
    assert 0 < out[0, 8, 0] < 255, "a mid-grey stays mid-grey"


def test_cmyk_jpeg_decodes_to_its_rgb_colour():
    out = _rgb(decode_image(_bytes(Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "JPEG", quality=95), (8, 8)))
    assert np.allclose(out.mean((0, 1)), (255, 0, 255), atol=12), out.mean((0, 1))


def test_palette_png_transparency_is_white_as_a_viewer_shows_it_not_black():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    for x in range(4, 8):
        for y in range(8):
            p.putpixel((x, y), 1)
    out = _rgb(decode_image(_bytes(p, "PNG", transparency=0), (8, 8)))
    assert (out[:, :4] == 255).all(), "the transparent half is white"
    assert (out[:, 4:] == (255, 0, 0)).all(), "the opaque half keeps its colour"
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert (_rgb(decode_image(_bytes(rgba, "PNG"), (4, 4))) == 255).all(), "fully transparent RGBA is white too"


def test_an_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 2
    assert np.allclose(_rgb(decode_image(data, (8, 8))).mean((0, 1)), (255, 0, 0), atol=3)


def test_a_non_image_file_beside_the_images_is_skipped_and_said(ray_local, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("taken on a Tuesday")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(tmp_path / "imgs", (8, 8))
    assert len(data) == 6 and sorted(data.ids) == sorted(f"{c}/{i}.png" for c in "ab" for i in range(3))
    assert any("skipped 1 file" in str(w.message) and "notes.txt" in str(w.message) for w in caught)
    (tmp_path / "only" / "c").mkdir(parents=True)
    (tmp_path / "only" / "c" / "readme.md").write_text("no images here")
    with pytest.raises(DataError, match="has no image files") as err:
        load_image_folder(tmp_path / "only", (8, 8))
    assert str(tmp_path / "only" / "c") in str(err.value)
