"""The output-image scheme on the shipped U-Net denoiser: each copy's output images name its buyer, after
the edits a leaker makes to images; the master's outputs, natural photographs and a model that is not
ours name nobody."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from wmtrace import api, denoise
from wmtrace.attacks import edit_images
from wmtrace.cli import app
from wmtrace.formats import images as image_files
from wmtrace.pipeline import images

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """A registry with the denoiser (white-box and output-image marks) and two buyers."""
    root = tmp_path_factory.mktemp("images")
    reg = api.open_registry(root / "registry", create=True)
    api.init(reg, "den", denoise.weights(), "wmtrace.denoise:build", data="tests.smallimages:dataset",
             scheme_names=["whitebox", "images"], output="embedding", strength=0.02, fidelity_target=0,
             image_layer="out.weight")
    buyers = api.issue(reg, buyers=2, out=root / "out")
    return root, reg, buyers


def _outputs(reg, path):
    return images.run_model(images.file_model(path, reg, "den"), reg, "den")


def _pixels(outputs):
    return [image_files.to_pixels(y) for _, y in outputs]


def _read(pixels):
    return [(i, image_files.from_pixels(p)) for i, p in enumerate(pixels)]


def test_each_copy_is_named_from_one_output_image_and_carries_both_marks(marked):
    root, reg, buyers = marked
    for b in buyers:
        r = images.trace_images(_outputs(reg, b.file)[:1], reg, "den")
        assert r.verdict == "identified" and r.buyer["id"] == b.id
        assert r.false_positive_probability <= 1e-6
        assert api.trace(b.file, reg).buyer["id"] == b.id  # the white-box mark is in the same copy


def test_copies_are_faithful_to_the_master(marked):
    """Outputs near the configured PSNR to the master's (45 dB; 8-bit outputs measured 43.6-45.6 dB), and
    the task PSNR against clean targets close to the master's. The goal is within 0.2 dB; copies measured
    0.13-0.30 dB below (BENCHMARKS.md, *Marks in output images*), so this checks the measured range."""
    root, reg, buyers = marked
    master = reg.master("den")
    model, _ = api.modelio.build(master)
    copy = images.file_model(buyers[0].file, reg, "den")
    x = images.probes(reg, "den")
    with torch.no_grad():
        assert denoise.psnr(denoise.quantize(copy(x)), denoise.quantize(model(x))) > 42.0  # goal: 40
    assert abs(denoise.task_psnr(copy, count=32) - denoise.task_psnr(model, count=32)) < 0.4


def test_nobody_innocent_is_named(marked):
    """The point here is that nobody is named: the master's outputs, natural photographs given as outputs,
    and a model that is not ours (a Gaussian blur, which denoises too)."""
    root, reg, _ = marked
    model, _ = api.modelio.build(reg.master("den"))
    r = images.trace_images(images.run_model(model, reg, "den"), reg, "den")
    assert r.verdict == "no watermark" and "unmarked master" in r.reason
    clean = denoise.Pairs("unseen", 16)
    r = images.trace_images([(i, clean[i][1]) for i in range(16)], reg, "den")
    assert r.verdict == "no watermark" and not r.colluders
    kernel = torch.tensor([1.0, 4, 6, 4, 1])
    kernel = (kernel[:, None] * kernel[None]) / 256

    def blur(x):
        return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), kernel.expand(3, 1, 5, 5), groups=3)

    r = images.trace_images(images.run_model(blur, reg, "den"), reg, "den")
    assert r.verdict == "no watermark" and not r.colluders


@pytest.mark.parametrize("edit,params", [("crop", {"fraction": 0.5}), ("jitter", {"strength": 0.1}),
                                         ("blur", {"radius": 0.5}), ("noise", {"sigma": 5})])
def test_named_after_edits_from_eight_images(marked, edit, params):
    root, reg, buyers = marked
    b = buyers[1]
    edited = edit_images(edit, _pixels(_outputs(reg, b.file))[:8], seed=3, **params)
    r = images.trace_images(_read(edited), reg, "den")
    assert r.verdict == "identified" and r.buyer["id"] == b.id


def test_plain_mark_survives_jpeg(tmp_path):
    """`image_mirror=False` trades surrogates for edits: JPEG 75 read from 16 images (z 6.8 on the benchmark's
    copy, 6.6 from 8; the mirrored default reads 5.6 and 5.1); 16 keeps a margin over the keys' spread."""
    reg = api.open_registry(tmp_path / "registry", create=True)
    api.init(reg, "den", denoise.weights(), "wmtrace.denoise:build", data="tests.smallimages:dataset",
             scheme_names=["images"], output="embedding", image_layer="out.weight", image_mirror=False)
    b = api.issue(reg, buyers=1, out=tmp_path / "out")[0]
    assert reg.master("den").config.schemes["images"]["mirror"] is False
    edited = edit_images("jpeg", _pixels(_outputs(reg, b.file)), seed=3, quality=75)
    r = images.trace_images(_read(edited), reg, "den")
    assert r.verdict == "identified" and r.buyer["id"] == b.id


def test_averaged_outputs_of_two_copies_accuse_only_them(marked):
    root, reg, buyers = marked
    mixed = edit_images("average", [_pixels(_outputs(reg, b.file)) for b in buyers])
    r = images.trace_images(_read(mixed), reg, "den")
    named = {c["id"] for c in r.colluders} | ({r.buyer["id"]} if r.buyer else set())
    assert named and named <= {b.id for b in buyers}


def test_cli_probes_then_trace_images(marked, tmp_path):
    root, reg, buyers = marked
    runner = CliRunner()
    location = ["--registry", str(root / "registry")]
    got = runner.invoke(app, ["probes", "--master", "den", "-o", str(tmp_path / "probes"), *location])
    assert got.exit_code == 0, got.output
    probes = sorted((tmp_path / "probes").glob("probe-*.png"))
    assert len(probes) == len(images.probes(reg, "den"))
    # the PNG probes are exactly what wmtrace computes with
    assert torch.equal(image_files.from_pixels(image_files.read_image(probes[0])), images.probes(reg, "den")[0])
    copy = images.file_model(buyers[0].file, reg, "den")
    answers = tmp_path / "answers"
    answers.mkdir()
    for p in probes[:2]:
        with torch.no_grad():
            y = copy(image_files.from_pixels(image_files.read_image(p))[None])[0]
        image_files.write_png(image_files.to_pixels(y), answers / p.name)
    got = runner.invoke(app, ["trace-images", str(answers), "--master", "den", "--json", *location])
    assert got.exit_code == 0, got.output
    assert json.loads(got.stdout)["buyer"]["id"] == buyers[0].id
    got = runner.invoke(app, ["trace-images", "--model", str(buyers[1].file), "--master", "den", "--json", *location])
    assert got.exit_code == 0 and json.loads(got.stdout)["buyer"]["id"] == buyers[1].id


def test_cli_bad_images_are_one_line_errors(marked, tmp_path):
    root, reg, _ = marked
    runner = CliRunner()
    location = ["--registry", str(root / "registry")]
    cases = tmp_path / "cases"
    cases.mkdir()
    (cases / "probe-00.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # truncated
    shutil.copy(denoise.weights(), cases / "probe-01.png")  # not an image
    stray = tmp_path / "stray"
    stray.mkdir()
    image_files.write_png(np.zeros((96, 96, 3), np.uint8), stray / "holiday.png")  # not named as a probe
    for target in (cases / "probe-00.png", cases / "probe-01.png", stray, tmp_path / "missing.png"):
        got = runner.invoke(app, ["trace-images", str(target), "--master", "den", *location])
        assert got.exit_code == 2, (target, got.output)
        lines = [line for line in got.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in got.output
