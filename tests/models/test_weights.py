"""Weight sources: the packaged EfficientNet-Lite0 is real ImageNet; local files load without pickle.

The other packaged backbones are in test_packaged_weights.py."""

import pickle

import numpy as np
import pytest
import torch

from handlens.core.errors import InputError
from handlens.models.backbones import BACKBONES
from handlens.models.classifier import create_classifier
from handlens.models.weights import packaged_efficientnet_lite0_state, read_state_dict

ESPRESSO, CAT_CLASSES = 967, set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def imagenet_lite0():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = packaged_efficientnet_lite0_state()
    assert len(state) == 296
    model.load_state_dict(state, strict=True)
    return model.eval()


def _classify(model, image: np.ndarray) -> torch.Tensor:
    from handlens.transforms.preprocess import normalize_batch, preprocess_image

    spec = BACKBONES.get("efficientnet_lite0")
    array = preprocess_image(image, spec.preprocess())
    batch = normalize_batch(torch.from_numpy(array).permute(2, 0, 1)[None], spec.mean, spec.std)
    with torch.inference_mode():
        return torch.softmax(model(batch), 1)[0]


def test_packaged_weights_recognise_real_photos(imagenet_lite0):
    import skimage.data

    coffee = _classify(imagenet_lite0, skimage.data.coffee())
    assert int(coffee.argmax()) == ESPRESSO and float(coffee.max()) > 0.5
    cat = _classify(imagenet_lite0, skimage.data.chelsea())
    assert int(cat.argmax()) in CAT_CLASSES


def test_packaged_weights_reach_the_classifier_backbone(imagenet_lite0):
    model = create_classifier("efficientnet_lite0", 3, weights="packaged")
    reference = imagenet_lite0.state_dict()
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_no_packaged_weights_for_resnet18():
    with pytest.raises(InputError, match="no packaged weights ship for resnet18; packaged weights exist for "
                                         "efficientnet_lite0, "):
        create_classifier("resnet18", 3, weights="packaged")


def test_local_safetensors_and_pth_files(tmp_path):
    from safetensors.torch import save_file

    source = create_classifier("tiny_cnn", 3)
    save_file({k: v.contiguous() for k, v in source.backbone.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(source.backbone.state_dict(), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = create_classifier("tiny_cnn", 3, weights=str(tmp_path / name))
        for key, value in loaded.backbone.state_dict().items():
            assert torch.equal(value, source.backbone.state_dict()[key])


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this would run arbitrary code",))

    path = tmp_path / "evil.pth"
    with path.open("wb") as handle:
        pickle.dump({"weight": Evil()}, handle)
    with pytest.raises(InputError, match="pickled objects are refused"):
        read_state_dict(path)


def test_weights_for_another_architecture_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"something.else": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="none of the 1 tensors"):
        create_classifier("tiny_cnn", 3, weights=str(tmp_path / "other.safetensors"))
    with pytest.raises(InputError, match="does not exist"):
        create_classifier("tiny_cnn", 3, weights=str(tmp_path / "missing.pth"))
