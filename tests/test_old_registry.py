"""A registry written by an earlier release keeps working: its copies trace, and it issues more."""

import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from wmtrace import api, attacks

DATA = Path(__file__).parent / "data" / "registry-0.1.0"


def test_a_registry_from_0_1_0_traces_its_copies_and_issues_more(tmp_path):
    root = tmp_path / "registry"
    shutil.copytree(DATA / "registry", root)
    (root / "keys" / "small.key").chmod(0o600)  # git keeps no file modes; the key reader insists on 0600
    with api.open_registry(root) as reg:
        r = api.trace(DATA / "buyer-0002.safetensors", reg)
        assert (r.verdict, r.buyer, r.bit_errors) == ("identified", {"id": 2, "name": "buyer-0002"}, 0)
        pruned = tmp_path / "pruned.safetensors"
        save_file(attacks.prune_global(load_file(DATA / "buyer-0002.safetensors"), 0.8), pruned)
        assert api.trace(pruned, reg).buyer == {"id": 2, "name": "buyer-0002"}
        (new,) = api.issue(reg, buyers=1, out=tmp_path / "out", eval_samples=0)
        assert new.id == 3
        assert api.trace(new.file, reg).buyer == {"id": 3, "name": "buyer-0003"}
