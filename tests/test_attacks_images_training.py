"""The training attacks on image-to-image copies: a surrogate trained on a copy's 8-bit answers, and
fine-tuning on clean pairs. The shipped denoiser is the copy; runs are a few hundred steps on 16x16
crops so the file stays fast, and the thresholds are set from what such runs measured, with a margin."""

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

from wmtrace import api, denoise, example
from wmtrace.attacks import ATTACKS, finetune_images, surrogate_images
from wmtrace.attacks.finetune_images import finetune_images as finetune
from wmtrace.attacks.surrogate_images import answers, psnr_to
from wmtrace.attacks.surrogate_images import surrogate_images as surrogate
from wmtrace.errors import BadArgument, BadInput


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    model = denoise.build()
    model.load_state_dict(load_file(str(denoise.weights())))
    return model.eval()


@pytest.fixture(scope="module")
def crops() -> tuple[torch.Tensor, torch.Tensor]:
    """256 noisy training inputs cut to 16x16 (cheap steps), and 8 held-out 96x96 test inputs."""
    train, test = denoise.Pairs("train", 256, clean=False), denoise.Pairs("test", 8)
    x = torch.stack([train[i] for i in range(len(train))])[..., :16, :16]
    return x, torch.stack([test[i][0] for i in range(len(test))])


def grey(split: str) -> torch.utils.data.Dataset:
    """Inputs the example classifier takes (1 x 28 x 28), as `--data` names a function (no labels)."""
    return torch.utils.data.TensorDataset(torch.rand(8, 1, 28, 28))


def _never(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the teacher was queried although the arguments were wrong")


# Steps per arch: the same U-Net and the smaller one learn fast (they are residual); the plain CNN must
# learn the identity from scratch and needs more. Measured PSNR to the teacher on held-out inputs:
# same 30.5, unet 31.7, cnn 33.0 dB (noisy inputs: 20.8 dB; cnn over seeds 1-3: 25.4 to 31.3 dB).
@pytest.mark.parametrize("arch, steps", [("same", 100), ("unet", 150), ("cnn", 250)])
def test_the_surrogate_of_each_arch_learns_the_teacher(teacher, crops, arch, steps):
    x, held = crops
    model = surrogate(teacher, x, arch, steps=steps, batch=16, factory=denoise.build)
    assert not model.training
    noisy = denoise.psnr(held, answers(teacher, held))
    learned = psnr_to(model, teacher, held)
    assert learned > 26 and learned > noisy + 5, (arch, learned, noisy)
    if arch == "same":  # trained from scratch: none of the copy's weights
        mine, copy = model.state_dict(), teacher.state_dict()
        assert mine.keys() == copy.keys() and not any(torch.equal(mine[k], copy[k]) for k in mine)
    else:
        assert type(model) is not type(teacher)


def test_l1_and_l2_both_train_and_differ_and_a_seed_repeats_a_run(teacher, crops):
    x = crops[0][:64]
    runs = {(loss, seed): surrogate(teacher, x, "unet", loss, steps=4, batch=8, seed=seed).state_dict()
            for loss, seed in (("l1", 0), ("l2", 0), ("l2", 1))}
    fresh = surrogate_images.student("unet", None, 0).state_dict()  # what seed 0 starts from
    assert not torch.equal(runs["l2", 0]["out.weight"], fresh["out.weight"])
    assert not torch.equal(runs["l1", 0]["out.weight"], runs["l2", 0]["out.weight"])
    assert not torch.equal(runs["l2", 1]["out.weight"], runs["l2", 0]["out.weight"])
    again = surrogate(teacher, x, "unet", "l2", steps=4, batch=8, seed=0).state_dict()
    assert all(torch.equal(again[k], runs["l2", 0][k]) for k in again)


@pytest.mark.parametrize("kwargs, problem", [
    ({"arch": "same"}, "arch 'same' needs the copy's model factory"),
    ({"arch": "resnet"}, "arch 'resnet': use one of same, unet, cnn"),
    ({"loss": "ssim"}, "loss 'ssim': use one of l1, l2"),
    ({"steps": 0}, "steps 0 and batch 32 must be >= 1"),
    ({"lr": -1.0}, "learning rate -1.0 > 0"),
])
def test_bad_arguments_are_one_line_before_the_teacher_is_queried(crops, kwargs, problem):
    with pytest.raises(BadInput, match=problem) as e:
        surrogate(_never, crops[0], **kwargs)
    assert "\n" not in str(e.value)


def test_inputs_and_answers_that_are_not_images_are_one_line(teacher, crops):
    for bad in (crops[0][:, :1], crops[0] * 255, crops[0][0]):
        with pytest.raises(BadInput, match="surrogate-images inputs") as e:
            surrogate(teacher, bad, steps=1)
        assert "\n" not in str(e.value)
    with pytest.raises(BadInput, match="not images") as e:  # e.g. a classifier, the default --model
        surrogate(lambda x: x.mean((2, 3)), crops[0][:4], steps=1)
    assert "\n" not in str(e.value)


def test_finetuning_moves_the_weights_keeps_the_task_and_leaves_the_copy_unchanged(teacher):
    pairs, before = denoise.Pairs("train", 64), {k: v.clone() for k, v in teacher.state_dict().items()}
    test = denoise.Pairs("test", 16)
    tuned = finetune(teacher, pairs, steps=20, lr=1e-4, batch=8)
    assert not tuned.training and tuned is not teacher
    assert all(torch.equal(teacher.state_dict()[k], before[k]) for k in before)
    assert sum(not torch.equal(tuned.state_dict()[k], before[k]) for k in before) == len(before)
    psnr, tuned_psnr = finetune_images.task_psnr(teacher, test), finetune_images.task_psnr(tuned, test)
    assert psnr > 28 and abs(tuned_psnr - psnr) < 2, (psnr, tuned_psnr)
    sgd = finetune(teacher, pairs, steps=3, lr=1e-4, batch=8, optimizer="sgd", loss="l1")
    assert not torch.equal(sgd.state_dict()["out.weight"], tuned.state_dict()["out.weight"])
    for kwargs, problem in (({"optimizer": "lion"}, "optimizer 'lion'"), ({"loss": "l3"}, "loss 'l3'")):
        with pytest.raises(BadInput, match=problem):
            finetune(teacher, pairs, steps=1, **kwargs)
    with pytest.raises(BadInput, match="input, target"):  # noisy inputs alone: denoise:dataset, not :Pairs
        finetune(teacher, denoise.dataset("train"), steps=1)


@pytest.mark.parametrize("attack, function", [
    ("surrogate-images", surrogate_images.surrogate_images), ("finetune-images", finetune_images.finetune_images)])
def test_declared_parameters_are_the_functions_defaults(attack, function):
    declared = ATTACKS[attack]
    assert declared.needs_data and not declared.merges
    signature = inspect.signature(function).parameters
    for p in declared.params:
        if p.name in signature:  # `pairs` is how many inputs the file route takes, not a keyword
            assert signature[p.name].default == p.default, (attack, p.name)
    assert {p.name for p in declared.params} - set(signature) <= {"pairs"}
    assert set(declared.param("loss").choices) == set(surrogate_images.LOSSES)


def test_both_attacks_run_from_files(tmp_path):
    source, model = str(denoise.weights()), "wmtrace.denoise:build"
    out = tmp_path / "surrogate.safetensors"
    info = api.attack("surrogate-images", source, out, factory=model, data="wmtrace.denoise:dataset",
                      arch="unet", pairs=32, steps=2)
    assert (info["arch"], info["loss"], info["pairs"], info["lr"]) == ("unet", "l2", 32, 2e-3)
    assert 0 < info["psnr_to_copy"] < 60
    rebuilt = surrogate_images.unet()
    rebuilt.load_state_dict(load_file(str(out)))  # the surrogate's own factory builds it again
    out = tmp_path / "tuned.safetensors"
    info = api.attack("finetune-images", source, out, factory=model, data="wmtrace.denoise:Pairs", steps=2, batch=4)
    assert info["optimizer"] == "adam" and abs(info["task_psnr"] - info["task_psnr_before"]) < 1
    assert load_file(str(out)).keys() == load_file(source).keys()
    with pytest.raises(BadArgument, match="arch 'vit': choose from same, unet, cnn"):
        api.attack("surrogate-images", source, out, factory=model, data="wmtrace.denoise:dataset", arch="vit")
    classifier = tmp_path / "classifier.safetensors"  # the example CNN, --model's default, on grey images
    save_file(example.build().state_dict(), str(classifier))
    with pytest.raises(BadInput, match="expected RGB images"):
        api.attack("surrogate-images", classifier, out, data=f"{__name__}:grey", pairs=8, steps=1)
