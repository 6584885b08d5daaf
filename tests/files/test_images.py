"""Image folders (`fid --reference DIR`, `train --data DIR`, `agree --data DIR`) are read through one
reader that converts by mode: the same pixels stored as grey, grey palette, grey + alpha or 16-bit
grey PNGs are the same tensor, hence the same FID and the same first training loss; a colour palette
reads as its RGB; a mode it cannot read, or a file that is not a readable image, is one line naming
the file (exit 2)."""

import json

import numpy as np
import pytest
import torch
from conftest import error, ok
from PIL import Image

from fmconvert.files.images import load_folder

N = 24  # digits per folder: a few, so each command below takes about a second


@pytest.fixture(scope="module")
def digits():
    """(N, 8, 8) uint8 grey digits (17 levels, 0..255)."""
    from fmconvert.zoo.datasets import load_digits

    return load_digits("held_out").images[:N, 0].numpy()


def grey_palette(pixels):
    """A 'P' image of grey ``pixels`` whose palette holds only its grey levels, in reverse order,
    so its indices are not its pixel values."""
    levels = np.unique(pixels)[::-1].astype(np.int64)
    index = np.searchsorted(-levels, -pixels.astype(np.int64)).astype(np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(np.repeat(levels, 3).tolist())
    return image


WRITERS = {
    "L": lambda a: Image.fromarray(a, "L"),
    "P": grey_palette,
    "LA": lambda a: Image.fromarray(np.stack([a, np.full_like(a, 255)], -1), "LA"),
    "I;16": lambda a: Image.fromarray(a.astype(np.uint16) * 257),  # v·257: 8-bit v as 16-bit
    "RGB": lambda a: Image.fromarray(np.stack([a] * 3, -1), "RGB"),
    "RGBA": lambda a: Image.fromarray(np.stack([a] * 3 + [np.full_like(a, 255)], -1), "RGBA"),
}
GREY = ["L", "P", "LA", "I;16"]


def write(folder, images, suffix=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:06d}{suffix}")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, digits):
    """One folder of the same digits per mode of WRITERS."""
    root = tmp_path_factory.mktemp("modes")
    made = {}
    for mode, writer in WRITERS.items():
        images = [writer(a) for a in digits]
        assert images[0].mode == mode
        made[mode] = write(root / mode.replace(";", ""), images)
        assert Image.open(made[mode] / "000000.png").mode == mode  # as written, so read back
    return made


def test_grey_modes_read_as_the_same_tensor(folders, digits):
    """L, grey palette (palette indices ≠ pixels), opaque LA and 16-bit v·257 are (N, 1, 8, 8) uint8, the
    digits themselves; RGB and RGBA of those digits are 3 channels, each the grey."""
    expected = torch.from_numpy(digits)[:, None]
    for mode in GREY:
        got = load_folder(folders[mode])
        assert got.dtype == torch.uint8 and torch.equal(got, expected), mode
        assert got.stride() == expected.stride()  # plain strides: convolutions (digits features) take one path
    for mode in ("RGB", "RGBA"):
        assert torch.equal(load_folder(folders[mode]), expected.expand(-1, 3, -1, -1)), mode


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    """16-bit v reads as round(v·255/65535): 257·k reads as k exactly, in between rounds to nearest."""
    values = np.array([[0, 128, 129, 32767, 32896, 65407, 65535, 257 * 77]], dtype=np.uint16)
    write(tmp_path, [Image.fromarray(values)])
    expected = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    assert load_folder(tmp_path)[0, 0].numpy().tolist() == expected.tolist()


def test_a_colour_palette_reads_as_its_rgb_and_a_mixed_folder_as_rgb(tmp_path, digits):
    """A folder of colour palette images reads as the RGB folder of the same pixels; a folder with
    one colour image among grey ones reads as RGB, each grey image in all three channels."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (4, 8, 8), dtype=np.uint8)
    rgb = write(tmp_path / "rgb", [Image.fromarray(colours[i], "RGB") for i in index])
    paletted = []
    for i in index:
        image = Image.fromarray(i, "P")
        image.putpalette(colours.flatten().tolist())
        paletted.append(image)
    palette = write(tmp_path / "palette", paletted)
    expected = torch.from_numpy(colours[index]).permute(0, 3, 1, 2)
    assert torch.equal(load_folder(rgb), expected)
    assert torch.equal(load_folder(palette), expected)
    mixed = write(tmp_path / "mixed", [Image.fromarray(digits[0]), Image.fromarray(colours[index[0]], "RGB")])
    got = load_folder(mixed)
    assert got.shape == (2, 3, 8, 8)
    assert torch.equal(got[0], torch.from_numpy(digits[0]).expand(3, -1, -1))


def test_jpeg_reads_as_its_decoded_pixels(tmp_path, digits):
    """JPEG is lossy: a grey JPEG reads as the grey pixels Pillow decodes (one channel); a CMYK JPEG
    as Pillow's RGB of it (three channels)."""
    grey = write(tmp_path / "grey", [Image.fromarray(a) for a in digits[:3]], ".jpg")
    decoded = np.stack([np.asarray(Image.open(p)) for p in sorted(grey.iterdir())])
    assert torch.equal(load_folder(grey), torch.from_numpy(decoded)[:, None])
    cmyk = write(tmp_path / "cmyk", [Image.fromarray(np.stack([a] * 3, -1)).convert("CMYK") for a in digits[:3]], ".jpg")
    decoded = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(cmyk.iterdir())])
    assert torch.equal(load_folder(cmyk), torch.from_numpy(decoded).permute(0, 3, 1, 2))


def test_tiff_files_are_read_not_skipped(tmp_path, digits):
    """A folder of TIFFs (where float and 32-bit images come from) is read like PNGs; before, its
    files were skipped without a word."""
    write(tmp_path, [Image.fromarray(a) for a in digits[:3]], ".tif")
    assert torch.equal(load_folder(tmp_path), torch.from_numpy(digits[:3])[:, None])


def test_agree_reads_folders_through_the_same_reader(folders):
    from fmconvert.evaluation.agreement import load_points

    expected = load_points(str(folders["L"]))
    for mode in GREY:
        assert torch.equal(load_points(str(folders[mode]), 5), expected[:5]), mode


def fid_of(reference):
    result = ok("fid", "builtin:digits-eps", "--reference", reference, "--features", "digits", "--steps", 1,
                "--num-images", 8, "--batch-size", 8, "--no-cache", "--json")
    return json.loads(result.stdout)["rows"][0]["fid"]


def test_the_same_pixels_give_the_same_fid(folders):
    """`fid --reference DIR`: the grey modes give one FID exactly; RGB of the same grey to float rounding
    (the digits features average the three channels)."""
    fids = {mode: fid_of(folders[mode]) for mode in GREY + ["RGB"]}
    assert all(fids[mode] == fids["L"] for mode in GREY), fids
    assert fids["RGB"] == pytest.approx(fids["L"], rel=1e-5), fids


def test_the_same_pixels_give_the_same_first_training_loss(folders, tmp_path):
    """`train --data DIR`: step 1's loss (the pretrained digits-eps, same draws) is the same for every grey mode."""
    losses = {}
    for mode in GREY:
        summary = ok("train", "builtin:digits-eps", "--data", folders[mode], "--out", tmp_path / mode.replace(";", ""),
                     "--train-steps", 1, "--batch-size", 8, "--json")
        losses[mode] = json.loads(summary.stdout)["first_loss"]
    assert all(loss == losses["L"] for loss in losses.values()), losses


def refusal(folder):
    return error(2, "fid", "builtin:digits-eps", "--reference", folder, "--steps", 1, "--num-images", 4,
                 "--batch-size", 4, "--no-cache")


def test_unreadable_images_are_refused_in_one_line_naming_the_file(tmp_path, digits):
    """A float ('F') image (TIFF data: PNG cannot hold floats; Pillow reads a file by its content), a
    truncated PNG, a file that is no image, and images that differ in size: one line naming the file,
    exit 2, in fid and train alike."""
    good = [Image.fromarray(a) for a in digits[:3]]
    floats = write(tmp_path / "float", good)
    Image.fromarray(digits[3].astype(np.float32) / 255, "F").save(floats / "000003.png", format="TIFF")
    line = refusal(floats)
    assert "000003.png" in line and "'F'" in line, line
    line = error(2, "train", "builtin:digits-eps", "--data", floats, "--out", tmp_path / "out", "--train-steps", 1)
    assert "000003.png" in line and "'F'" in line, line

    truncated = write(tmp_path / "truncated", good)
    whole = (truncated / "000001.png").read_bytes()
    (truncated / "000001.png").write_bytes(whole[:len(whole) - 30])
    assert "000001.png" in refusal(truncated)

    junk = write(tmp_path / "junk", good)
    (junk / "000002.png").write_text("not an image")
    assert "000002.png" in refusal(junk)

    sizes = write(tmp_path / "sizes", good + [Image.fromarray(np.zeros((9, 8), np.uint8))])
    line = refusal(sizes)
    assert "000003.png" in line and "9×8" in line, line
