"""A data reference (``builtin:NAME[/SPLIT]`` or an image folder) is parsed once and read by one
reader, :class:`fmconvert.files.references.DataRef`: agree's points, fid's reference batches and
cache key, and train's data are what it gives, for every bundled data set and split
(:data:`fmconvert.zoo.datasets.DATASETS`) and for a folder."""

import numpy as np
import pytest
import torch
from PIL import Image

from fmconvert.errors import UsageError
from fmconvert.files.references import parse_data
from fmconvert.zoo.datasets import DATASETS

BUILTIN = [f"builtin:{name}" + ("" if split == "all" else f"/{split}")
           for name, dataset in DATASETS.items() for split in dataset.splits]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Seven grey digits as PNGs (more than one batch of 3)."""
    root = tmp_path_factory.mktemp("refs")
    for i, image in enumerate(parse_data("builtin:digits/held_out").images(7)[:, 0].numpy()):
        Image.fromarray(image, "L").save(root / f"{i:06d}.png")
    return root


def references(folder):
    return BUILTIN + [str(folder)]


def test_every_reference_reads_the_same_images_whole_and_in_batches(folder):
    for text in references(folder):
        ref = parse_data(text)
        images = ref.images()
        assert images.dtype == torch.uint8 and images.ndim == 4 and len(images) > 0, text
        assert torch.equal(torch.cat(list(ref.batches(3))), images), text
        assert torch.equal(ref.images(5), images[:5]), text


def test_each_builtin_split_is_its_data_sets_split():
    from fmconvert.zoo.datasets import load_digits

    for split in DATASETS["digits"].splits:
        assert torch.equal(parse_data(f"builtin:digits/{split}" if split != "all" else "builtin:digits").images(),
                           load_digits(split).images), split
    train, held_out = (len(parse_data(f"builtin:digits/{s}").images()) for s in ("train", "held_out"))
    assert train + held_out == len(parse_data("builtin:digits").images())


def test_agree_fid_and_train_read_through_the_reference(folder):
    """The three loaders give the reference's images (agree in data space x = u/127.5 − 1)."""
    from fmconvert.evaluation.agreement import load_points
    from fmconvert.training.data import load_training_data

    for text in references(folder):
        images = parse_data(text).images()
        assert torch.equal(load_points(text, 4), images[:4].float() / 127.5 - 1), text
        data = load_training_data(text, tuple(images.shape[1:]), latent_model=False)
        assert data.kind == "images" and torch.equal(data.values, images), text


def test_the_cache_key_follows_the_images(folder, tmp_path):
    """fid's reference cache key: one per split, and a folder's changes when a file is added."""
    keys = {parse_data(text).cache_key() for text in BUILTIN}
    assert len(keys) == len(BUILTIN)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in sorted(folder.iterdir()):
        (copy / path.name).write_bytes(path.read_bytes())
    before = parse_data(str(copy)).cache_key()
    assert parse_data(str(copy)).cache_key() == before
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(copy / "000099.png")
    assert parse_data(str(copy)).cache_key() != before


def test_a_statistics_file_has_no_images(tmp_path):
    stats = tmp_path / "ref.safetensors"
    stats.write_bytes(b"")
    ref = parse_data(str(stats), statistics=True)
    with pytest.raises(UsageError, match="statistics file"):
        ref.images()
