"""`query` over a real KServe server (OIP v2 on 127.0.0.1): buyer copies of the `issued` registry served
with top-1 labels or full scores are named; the master, an independent model and every copy are never
named as someone else; serving attacks (an ensemble of two copies, resizing + JPEG) never make an
innocent buyer named. One server serves every deployment; each test is one or two query sessions."""

import shutil

import pytest

from tests import servers
from wmtrace import api
from wmtrace.pipeline.trace import COLLUDERS, IDENTIFIED, NO_WATERMARK

BOUNDARY = 256  # the black-box plan's boundary queries: all that labels can be read from


def named(r) -> set[int]:
    """Every buyer a result names: the identified buyer, or the colluders accused by score."""
    return {r.buyer["id"]} if r.buyer else {c["id"] for c in r.colluders}


@pytest.fixture(scope="module")
def deployments(issued, master_file, other_master_file):
    """Model name -> `servers.leak` entry: each copy behind top-1 labels, copy 1 with full scores, the
    master and an independently trained model, an ensemble of copies 1 and 2, copy 1 behind JPEG."""
    _, buyers = issued
    files = {b.id: b.file for b in buyers}
    models = {f"copy{i}-top1": servers.leak(f, attack="top1") for i, f in files.items()}
    models |= {
        "copy1-scores": servers.leak(files[1], reveal="scores"),
        "master-top1": servers.leak(master_file, attack="top1"),
        "master-scores": servers.leak(master_file, reveal="scores"),
        "other-top1": servers.leak(other_master_file, attack="top1"),
        "ensemble12-top1": servers.leak(files[1], files[2], reveal="top1", attack="ensemble"),
        "resize-jpeg-top1": servers.leak(files[1], reveal="top1", attack="preprocess"),
        "jpeg-top1": servers.leak(files[1], reveal="top1", attack="preprocess", params={"size": 0}),
    }
    return models


@pytest.fixture(scope="module")
def kserve(deployments):
    pytest.importorskip("kserve")
    with servers.kserve_server(deployments) as url:
        yield url


@pytest.fixture(scope="module")
def registry(issued, tmp_path_factory):
    """A private copy of the issued registry: every query session writes an audit entry."""
    root, _ = issued
    dest = tmp_path_factory.mktemp("endpoint") / "w"
    shutil.copytree(root, dest, symlinks=True)
    reg = api.open_registry(dest / "registry")
    yield reg
    reg.close()


def ask(kserve, registry, model: str, reveal: str):
    with api.open_target(f"{kserve}/v2/models/{model}", reveal=reveal, classes=10) as t:
        r = api.query(t, registry)
        assert r.queries == t.queries  # every answer read is counted, none hidden
    return r


def test_each_copy_served_with_labels_only_names_its_buyer_and_nobody_else(kserve, registry, issued):
    for b in issued[1]:
        r = ask(kserve, registry, f"copy{b.id}-top1", "top1")
        assert r.verdict == IDENTIFIED and r.buyer["id"] == b.id, (b.id, r)
        assert named(r) == {b.id}  # never another buyer
        assert r.false_positive_probability <= 1e-6
        assert r.queries <= BOUNDARY


def test_a_copy_served_with_full_scores_is_named_within_64_queries(kserve, registry):
    r = ask(kserve, registry, "copy1-scores", "scores")
    assert r.verdict == IDENTIFIED and r.buyer["id"] == 1
    assert r.queries <= 64 and r.false_positive_probability <= 1e-6


def test_the_master_served_is_never_accused(kserve, registry):
    # The point: the unmarked master, whatever it reveals, names nobody.
    for reveal in ("top1", "scores"):
        r = ask(kserve, registry, f"master-{reveal}", reveal)
        assert r.verdict == NO_WATERMARK and not named(r), (reveal, r)


def test_an_independently_trained_model_is_never_accused(kserve, registry):
    # The point: a model that is not ours names nobody; labels are read from every boundary query.
    r = ask(kserve, registry, "other-top1", "top1")
    assert r.verdict == NO_WATERMARK and not named(r)
    assert r.queries == BOUNDARY


def test_an_ensemble_of_two_copies_never_names_an_innocent(kserve, registry):
    # The point: buyer 3 did not collude and must not be named. Measured on the example registry: both
    # colluders named by score (verdict colluders, bound ~1e-11) after 256 labels; not asserted, a
    # mix of two codewords may also name nobody.
    r = ask(kserve, registry, "ensemble12-top1", "top1")
    assert named(r) <= {1, 2}, r
    assert r.verdict in (COLLUDERS, IDENTIFIED, NO_WATERMARK)
    if r.verdict == COLLUDERS:
        assert all(c["false_accusation_bound"] <= 1e-6 for c in r.colluders)


def test_preprocessing_never_names_an_innocent_and_jpeg_alone_keeps_the_buyer(kserve, registry):
    # Resizing to 24 pixels and back, then JPEG 75: the point is that nobody innocent is named.
    # Measured: the mark does not survive it (verdict no watermark after 256 labels) - a shortfall.
    r = ask(kserve, registry, "resize-jpeg-top1", "top1")
    assert named(r) <= {1}, r
    # JPEG 75 alone (no resize) moves the boundary queries too little to change their labels.
    r = ask(kserve, registry, "jpeg-top1", "top1")
    assert r.verdict == IDENTIFIED and r.buyer["id"] == 1 and r.false_positive_probability <= 1e-6
