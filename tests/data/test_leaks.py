"""The copy check's parts: dHash survives resizing and re-encoding, tells unrelated images apart, skips flat
images; find_copies prefers an exact copy and words its verdict."""

import io

import numpy as np
from PIL import Image

from handlens.data.leaks import NEAR_DUPLICATE_MAX_DISTANCE, ImageRef, dhash, find_copies, hamming
from tests.conftest import textured


def _array(img):
    return np.asarray(img.convert("RGB"))


def test_dhash_survives_resizing_and_jpeg_but_not_another_picture():
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((256, 256))
    base = dhash(_array(photo))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=70)
    for variant in (photo.resize((120, 120)), photo.resize((500, 500)), Image.open(buffer)):
        assert hamming([base], [dhash(_array(variant))])[0, 0] <= 2
    others = [dhash(_array(Image.fromarray(img).resize((256, 256)))) for img in (data.camera(), data.coffee())]
    assert hamming([base], others).min() > NEAR_DUPLICATE_MAX_DISTANCE
    assert hamming([base], [dhash(_array(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))])[0, 0] > 8


def test_flat_images_have_no_hash_and_hamming_counts_bits():
    assert dhash(np.full((40, 40, 3), 128, np.uint8)) is None
    assert dhash(np.asarray(textured(1))) is not None
    assert hamming([0b1011, 0], [0b0001, 2**64 - 1]).tolist() == [[2, 61], [1, 64]]


def test_find_copies_lists_each_test_image_once_exact_first():
    train = [ImageRef("/t/a.png", "A", 0b1111), ImageRef("/t/a_copy.png", "A", 0b1111), ImageRef("/t/b.png", "B", 0)]
    test = [ImageRef("/x/1.png", "A", 0b1111), ImageRef("/x/2.png", "C", 0b1), ImageRef("/x/3.png", "D", 2**64 - 1),
            ImageRef("/x/4.png", "E", None)]
    report = find_copies(test, train)
    pairs = [(p.test, p.train, p.kind, p.distance, p.others) for p in report.pairs]
    assert pairs == [("/x/1.png", "/t/a.png", "exact", 0, 1), ("/x/2.png", "/t/b.png", "near", 1, 2)]
    assert report.flat == 1
    assert report.verdict == "leaks: 2 of 4 test images are copies of training images (1 exact, 1 near-duplicate)"
    assert find_copies(test[2:], train).verdict == "no leak: none of the 2 test images matches a training image"
    assert find_copies(test[2:], train, near=False).verdict.startswith("no exact copy:")
    assert find_copies(test, []).verdict.startswith("not checked:")


def test_a_squashed_copy_is_found_by_its_whole_frame_when_its_centre_crop_differs(tmp_path):
    """As on real thin sections: a 500x380 image saved again at 224x224 is close to its original as a whole
    frame, far from it as the model's centre crop."""
    import numpy as np
    from PIL import Image

    from handlens.data.leaks import ImageRef, dhash, find_copies, frame_dhash, hamming

    rng = np.random.default_rng(5)
    small = rng.uniform(0, 255, (6, 8))  # large structures: what a hash keeps
    original = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((500, 380), Image.BICUBIC))
    squashed = np.asarray(Image.fromarray(original).resize((224, 224), Image.BICUBIC))
    Image.fromarray(original).save(tmp_path / "original.png")
    Image.fromarray(squashed).save(tmp_path / "squashed.png")

    def centre_crop(array):  # shorter side to 224, then the centre 224x224, as the model sees it
        h, w = array.shape
        scaled = np.asarray(Image.fromarray(array).resize((round(w * 224 / h), 224), Image.BICUBIC))
        left = (scaled.shape[1] - 224) // 2
        return scaled[:, left:left + 224]

    crops = dhash(centre_crop(original)), dhash(centre_crop(squashed))
    frames = frame_dhash(str(tmp_path / "original.png")), frame_dhash(str(tmp_path / "squashed.png"))
    assert hamming([crops[0]], [crops[1]])[0, 0] > 8 >= hamming([frames[0]], [frames[1]])[0, 0]
    report = find_copies([ImageRef(str(tmp_path / "squashed.png"), "b", crops[1], frames[1])],
                         [ImageRef(str(tmp_path / "original.png"), "a", crops[0], frames[0])])
    assert [p.kind for p in report.pairs] == ["near"] and report.verdict.startswith("leaks:")
    alone = find_copies([ImageRef("t", "b", crops[1])], [ImageRef("o", "a", crops[0])])
    assert alone.pairs == []  # the crop hashes alone miss it
