"""Attacks on output images (`wmtrace.attacks.edit_images`, `wmtrace edit-images`): each changes what it
claims, by a measured amount, on a real photograph; parameters are checked against the declarations;
hostile files are one BadInput line; the CLI writes lossless PNGs named after the inputs."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data
from typer.testing import CliRunner

from wmtrace.attacks import ATTACKS, IMAGE_ATTACKS, SERVING_ATTACKS, ImageAttack, edit_images, imaging
from wmtrace.cli import app
from wmtrace.errors import BadArgument, BadInput, CorruptFile

ALL = ["average", "blur", "crop", "jitter", "jpeg", "noise", "resize"]
runner = CliRunner()


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A 256x192 crop of a real photograph (face, suit, flag: edges, texture and flat areas)."""
    a = data.astronaut()[:192, :256].copy()
    a.setflags(write=False)  # an attack that changed its input in place would fail loudly
    return a


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


def detail(x: np.ndarray) -> float:
    """High-frequency energy: mean squared difference of neighbouring grey levels."""
    g = x.astype(np.float64).mean(2)
    return float((np.diff(g, axis=0) ** 2).mean() + (np.diff(g, axis=1) ** 2).mean())


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming `width` x `height` RGB pixels, with almost no data behind it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_catalog_lists_the_seven_image_attacks_apart_from_the_others():
    assert sorted(IMAGE_ATTACKS) == ALL
    assert all(isinstance(a, ImageAttack) for a in IMAGE_ATTACKS.values())
    assert [n for n, a in IMAGE_ATTACKS.items() if a.merges] == ["average"]
    assert {"prune", "noise", "collude"} <= set(ATTACKS) and "preprocess" in SERVING_ATTACKS  # unchanged
    assert IMAGE_ATTACKS["jpeg"].param("quality").default == 75 and IMAGE_ATTACKS["jpeg"].param("nope") is None


def test_jpeg_loses_what_its_quality_says(photo):
    scores = {q: psnr(photo, edit_images("jpeg", [photo], quality=q)[0]) for q in (20, 50, 95)}
    assert 25 < scores[50] < 45
    assert scores[20] < scores[50] < scores[95]
    out = edit_images("jpeg", [photo, photo[:50, :70]])  # sizes may differ between images
    assert [a.shape for a in out] == [photo.shape, (50, 70, 3)] and out[0].dtype == np.uint8


def test_resize_and_back_removes_detail_and_keeps_the_size(photo):
    back = edit_images("resize", [photo], scale=0.5)[0]
    assert back.shape == photo.shape and detail(back) < 0.7 * detail(photo)
    assert detail(edit_images("resize", [photo], scale=0.5, filter="bilinear")[0]) < detail(back)  # softer filter
    small = edit_images("resize", [photo], scale=0.5, back=False)[0]
    assert small.shape == (96, 128, 3)


def test_crop_keeps_the_fraction_of_the_area_where_it_says(photo):
    h, w = photo.shape[:2]
    for fraction in (0.25, 0.5, 0.9):
        (kept,) = edit_images("crop", [photo], fraction=fraction, seed=3)
        kh, kw = kept.shape[:2]
        assert abs(kh * kw / (h * w) - fraction) < 0.02 and abs(kw / kh - w / h) < 0.03
    centre = edit_images("crop", [photo], where="center")[0]
    top, left = (h - centre.shape[0]) // 2, (w - centre.shape[1]) // 2
    np.testing.assert_array_equal(centre, photo[top : top + centre.shape[0], left : left + centre.shape[1]])

    def position(seed: int) -> tuple[int, int]:
        kept = edit_images("crop", [photo], fraction=0.25, seed=seed)[0]
        spots = [(y, x) for y in range(h - kept.shape[0] + 1) for x in range(w - kept.shape[1] + 1)
                 if np.array_equal(photo[y : y + kept.shape[0], x : x + kept.shape[1]], kept)]
        assert len(spots) == 1  # a piece of the photograph, not a resampled one
        return spots[0]

    assert position(1) == position(1) and len({position(s) for s in range(4)}) > 1  # seeded, and random


def test_noise_has_the_standard_deviation_asked_for(photo):
    for sigma in (2.0, 5.0, 20.0):
        (noisy,) = edit_images("noise", [photo], sigma=sigma, seed=1)
        diff = noisy.astype(np.float64) - photo
        inside = (photo > 4 * sigma) & (photo < 255 - 4 * sigma)  # where clipping cannot bite
        assert abs(diff[inside].std() - sigma) < 0.05 * sigma + 0.3  # rounding adds 1/12 of a level's variance
        assert abs(diff[inside].mean()) < 0.1
    a, b = (edit_images("noise", [photo], seed=s)[0] for s in (1, 2))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(edit_images("noise", [photo], sigma=0)[0], photo)


def test_blur_removes_detail_in_proportion_to_its_radius(photo):
    d = [detail(edit_images("blur", [photo], radius=r)[0]) for r in (0.0, 1.0, 3.0)]
    assert d[0] == pytest.approx(detail(photo)) and d[2] < d[1] < 0.6 * d[0]


def test_jitter_moves_brightness_within_its_bound(photo):
    strength = 0.1
    ratios = [edit_images("jitter", [photo], strength=strength, seed=s)[0].mean() / photo.mean() for s in range(8)]
    assert all(1 - strength - 0.02 < r < 1 + strength + 0.02 for r in ratios)
    assert max(abs(r - 1) for r in ratios) > 0.02 and len({round(r, 4) for r in ratios}) == 8
    np.testing.assert_array_equal(edit_images("jitter", [photo], strength=0.0)[0], photo)
    hued = edit_images("jitter", [photo], strength=0.0, hue=0.25, seed=1)[0]
    assert np.abs(hued.astype(np.int16) - photo).mean() > 5  # colours turned: off unless asked


def test_average_is_the_rounded_mean_of_the_copies(photo):
    rng = np.random.default_rng(0)
    copies = [[np.clip(photo + rng.integers(-9, 10, photo.shape), 0, 255).astype(np.uint8), photo[:40, :60]]
              for _ in range(3)]
    for k in (2, 3):
        out = edit_images("average", copies[:k])
        for j in range(2):
            mean = np.mean([c[j].astype(np.float64) for c in copies[:k]], axis=0)
            np.testing.assert_array_equal(out[j], np.rint(mean).astype(np.uint8))
    with pytest.raises(BadInput, match="numbers of images"):
        edit_images("average", [copies[0], copies[1][:1]])
    with pytest.raises(BadInput, match="differs in shape"):
        edit_images("average", [copies[0], [copies[1][0], photo[:41, :60]]])
    with pytest.raises(BadInput, match="at least two"):
        edit_images("average", [copies[0]])


@pytest.mark.parametrize(("name", "params", "flag"), [
    ("jpeg", {"quality": 0}, "quality"), ("jpeg", {"quality": 96}, "quality"), ("jpeg", {"quality": "high"}, "quality"),
    ("resize", {"scale": 0}, "scale"), ("resize", {"filter": "nearest"}, "filter"),
    ("crop", {"fraction": 1.5}, "fraction"), ("crop", {"where": "left"}, "where"), ("noise", {"sigma": -1}, "sigma"),
    ("blur", {"radius": -0.5}, "radius"),
    ("jitter", {"strength": 1.0}, "strength"), ("jitter", {"hue": 0.7}, "hue"), ("jpeg", {"qualty": 50}, "qualty"),
    ("noise", {"seed": -1}, "seed"),
])
def test_bad_parameters_name_the_parameter(photo, name, params, flag):
    with pytest.raises(BadArgument) as e:
        edit_images(name, [photo], **params)
    assert e.value.param == flag and "\n" not in str(e.value)


def test_bad_images_and_names_are_refused(photo):
    with pytest.raises(BadInput, match="unknown image attack"):
        edit_images("sharpen", [photo])
    for bad in (photo.astype(np.float32), photo[..., 0], photo[:, :, :2], np.zeros((0, 5, 3), np.uint8), "a.png"):
        with pytest.raises(BadInput, match=r"\(H, W, 3\) uint8"):
            edit_images("blur", [bad])


def test_every_attack_leaves_its_inputs_alone_and_returns_new_arrays(photo):
    before = photo.copy()
    for name, attack in IMAGE_ATTACKS.items():
        images = [[photo], [photo]] if attack.merges else [photo]
        out = edit_images(name, images, seed=0)
        assert all(a is not photo and a.flags.writeable for a in out), name
    np.testing.assert_array_equal(photo, before)


@pytest.mark.parametrize(("kind", "error", "words"), [
    ("truncated", CorruptFile, "truncated"), ("text", BadInput, "not an image"),
    ("bomb", CorruptFile, "decompression bomb"), ("warned", CorruptFile, "decompression bomb"),
    ("budget", CorruptFile, "over the budget"), ("missing", BadInput, "no such file"),
    ("folder-with-fake", BadInput, "not an image"), ("folder-without-images", BadInput, "no images"),
])
def test_hostile_files_are_one_line(tmp_path, photo, kind, error, words):
    good = png_bytes(photo)
    path = tmp_path / "x.png"
    if kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "text":
        path.write_text("this is not a picture\n")
    elif kind in ("bomb", "warned", "budget"):  # claims 10^10, 10^8 (Pillow's warning) and 5.6e7 pixels
        path.write_bytes(png_header_only(*{"bomb": (100_000, 100_000), "warned": (10_000, 10_000),
                                           "budget": (8_000, 7_000)}[kind]))
    elif kind == "missing":
        path = tmp_path / "gone.png"
    else:
        path = tmp_path / "images"
        path.mkdir()
        (path / "notes.txt").write_text("not an image")
        if kind == "folder-with-fake":
            (path / "a.png").write_bytes(good)
            (path / "b.jpg").write_text("not an image either, whatever its suffix says")
    with pytest.raises(error, match=words) as e:
        imaging.read_images([path])
    assert "\n" not in str(e.value)


def test_a_folder_is_its_images_by_name_and_writing_is_lossless_png(tmp_path, photo):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(photo).save(src / "b.png")
    Image.fromarray(photo[:64, :64]).save(src / "a.jpg", quality=90)
    Image.fromarray(np.dstack([photo[:32, :32], np.full((32, 32), 7, np.uint8)])).save(src / "c.png")  # RGBA
    (src / "README.txt").write_text("passed over")
    named = imaging.read_images([src])
    assert [n for n, _ in named] == ["a", "b", "c"] and named[2][1].shape == (32, 32, 3)
    written = imaging.write_images(named, tmp_path / "out")
    assert [p.name for p in written] == ["a.png", "b.png", "c.png"]
    assert all(np.array_equal(imaging.read_image(p), a) for p, (_, a) in zip(written, named, strict=True))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png"]  # no temp files left
    before = (src / "b.png").read_bytes()
    with pytest.raises(BadInput, match="one of the inputs"):
        imaging.write_images([("b", photo[:5, :5])], src, inputs=[src / "b.png"])
    assert (src / "b.png").read_bytes() == before
    with pytest.raises(BadInput, match="both be written"):
        imaging.write_images([("a", photo), ("a", photo)], tmp_path / "o2")
    with pytest.raises(BadInput, match="plain file name"):
        imaging.write_images([("../up", photo)], tmp_path / "o3")


def cli(*args):
    return runner.invoke(app, ["edit-images", *map(str, args)])


def test_cli_round_trip_writes_pngs_named_after_the_inputs(tmp_path, photo):
    copies = []
    for k in range(2):
        folder = tmp_path / f"copy{k}"
        folder.mkdir()
        Image.fromarray(np.roll(photo, k, axis=1)).save(folder / "face.png")
        Image.fromarray(photo[:64, :80]).save(folder / "flag.png")
        copies.append(folder)
    r = cli("jpeg", copies[0], "-o", tmp_path / "jpeg", "--quality", 40)
    assert r.exit_code == 0, r.output
    out = sorted((tmp_path / "jpeg").iterdir())
    assert [p.name for p in out] == ["face.png", "flag.png"]
    assert 25 < psnr(photo, imaging.read_image(out[0])) < 45
    r = cli("average", *copies, "-o", tmp_path / "avg", "--json")
    assert r.exit_code == 0 and '"images": 2' in r.stdout, r.output
    expected = np.rint((photo.astype(np.float64) + np.roll(photo, 1, axis=1)) / 2).astype(np.uint8)
    np.testing.assert_array_equal(imaging.read_image(tmp_path / "avg" / "face.png"), expected)
    r = cli("crop", copies[0] / "face.png", "-o", tmp_path / "crop", "--fraction", 0.25, "--where", "center")
    assert r.exit_code == 0 and imaging.read_image(tmp_path / "crop" / "face.png").shape == (96, 128, 3), r.output


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, photo):
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(photo).save(bad / "good.png")
    (bad / "broken.png").write_bytes(png_bytes(photo)[:300])
    other = tmp_path / "other"
    other.mkdir()
    Image.fromarray(photo).save(other / "else.png")
    cases = [("noise", bad), ("jpeg", bad / "good.png", "--quality", 0), ("average", bad),
             ("blur", tmp_path / "nowhere"), ("average", bad / "good.png", other / "else.png"),
             ("resize", bad / "good.png", "--filter", "box")]
    for case in cases:
        r = cli(*case, "-o", tmp_path / "out")
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (case, r.output)
        assert "Traceback" not in r.output
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), case
    before = (bad / "good.png").read_bytes()
    r = cli("jpeg", bad / "good.png", "-o", bad)  # over the input itself
    assert r.exit_code == 2 and "is one of the inputs" in r.stderr, r.output
    r = cli("blur", other, "-o", other)  # into the inputs' own folder
    assert r.exit_code == 2 and "input folders" in r.stderr, r.output
    assert (bad / "good.png").read_bytes() == before and [p.name for p in other.iterdir()] == ["else.png"]


def test_cli_help_lists_every_image_attack():
    r = runner.invoke(app, ["edit-images", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and all(name in r.stdout for name in ALL)
    for name, attack in IMAGE_ATTACKS.items():  # each declared parameter is an option of its command
        sub = runner.invoke(app, ["edit-images", name, "--help"], env={"COLUMNS": "200"}).stdout
        assert all(f"--{p.name}" in sub for p in attack.params) and "--seed" in sub, name
    r = runner.invoke(app, ["--help"])
    assert "edit-images" in r.stdout
    assert Path(imaging.__file__).stem not in IMAGE_ATTACKS


def test_sixteen_bit_grey_is_scaled_not_clipped_and_float_pixels_refused(tmp_path):
    ramp = (np.arange(32 * 64).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    a = imaging.read_image(tmp_path / "deep.png")
    np.testing.assert_array_equal(a, np.repeat(np.rint(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=2))
    Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(BadInput, match="float pixels"):
        imaging.read_image(tmp_path / "float.tif")
