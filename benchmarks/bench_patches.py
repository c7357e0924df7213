"""Per-buyer patches (`issue --store patch`, `materialize`): storage per buyer, materialize speed, and
issuing MiniLM copies by the thousand.

    PYTHONPATH=. python benchmarks/bench_patches.py sizes --out benchmarks/results/patches.json
    PYTHONPATH=. python benchmarks/bench_patches.py speed --out benchmarks/results/patches_speed.json
    PYTHONPATH=. python benchmarks/bench_patches.py issue --buyers 10000 --check-every 100 \
        --registry /tmp/wmtrace-bench-patches/minilm --out benchmarks/results/patches_issue.json

sizes: MiniLM (registered as README's worked example, strength 0.02) issued with `--store patch`: the
patch's bytes against the full copy's; and the 1.1B-parameter checkpoint of bench_stream.py (bf16, 5
shards, two k_proj carriers), its copy made there as in bench_stream, its patch written by the same
`Patcher` the issue uses.
speed: the 1.1B copy materialized (folder of 5 shards, sha256 checked) against `shutil.copyfile`
of the full copy's files, side by side on the same disk, each run `--repeat` times (best kept), page
cache warm for both (the master and the copy were just written or read).
issue: MiniLM copies issued as patches in rounds of `--check-every` buyers; each round's last buyer
has its fidelity measured on `--eval-samples` held-out texts, the others none (the fidelity check is
the largest cost per buyer: 20 s of 23-43 s). Results are rewritten after every round, so a run cut
short reports what ran: buyers, seconds, bytes of patches and registry, and the projection to N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

FACTORY, DATA = "wmtrace.minilm:build", "wmtrace.minilm:dataset"


def du(path: Path) -> int:
    """Bytes on disk (allocated blocks) under `path`."""
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file())


def minilm_registry(root: Path):
    """The MiniLM master registered as the README's worked example (strength 0.02), once."""
    from wmtrace import api, minilm

    reg = api.open_registry(root, create=True)
    if not any(m.name == "minilm" for m in reg.masters()):
        api.init(reg, "minilm", minilm.weights(), FACTORY, DATA, output="embedding", strength=0.02)
    return reg


def sizes(args: argparse.Namespace) -> dict:
    from wmtrace import api

    reg = minilm_registry(args.registry)
    full = api.issue(reg, buyers=1, out=args.dir / "minilm-full", master="minilm", eval_samples=0)[0]
    patched = api.issue(reg, buyers=args.buyers, out=args.dir / "minilm-patch", master="minilm", eval_samples=0,
                        store="patch")
    copy_bytes = Path(full.file).stat().st_size
    rows = [Path(b.file).stat().st_size for b in patched]
    out = api.materialize(reg, patched[0].name, args.dir / "minilm-materialized.safetensors")
    minilm = {"copy_bytes": copy_bytes, "patch_bytes": rows, "percent": [100 * r / copy_bytes for r in rows],
              "materialized_sha256_ok": out["sha256"] == patched[0].sha256}
    (args.dir / "minilm-materialized.safetensors").unlink()
    return {"minilm": minilm, "llama_1b": llama_patch(args)}


def llama_patch(args: argparse.Namespace) -> dict:
    """bench_stream's checkpoint and copy; the copy's patch against the master, as `issue` writes it."""
    import bench_stream
    import torch
    from safetensors.torch import load_file

    from wmtrace.pipeline import patches
    from wmtrace.registry import Registry

    root = args.dir / "llama"
    if not (root / "leaked").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        ns = argparse.Namespace(layers=22, hidden=2048, intermediate=5632, kv=256, vocab=32000, shards=5, bits=256,
                                carrier_layers=[3, 17])
        bench_stream.make(root, ns)
    reg = Registry(root / "registry")
    m = reg.master(bench_stream.MASTER)
    b = reg.buyers(m.name)[0]
    index = root / "leaked"
    copy: dict[str, torch.Tensor] = {}
    for shard in sorted(index.glob("*.safetensors")):
        copy |= load_file(str(shard))
    order = list(bench_stream.llama_shapes(22, 2048, 5632, 256, 32000))  # the copy's order, as make wrote it
    copy = {k: copy[k] for k in order}
    m = type(m)(**{**m.__dict__, "config": type(m.config)(**{**m.config.__dict__, "shards": 5})})
    patcher = patches.Patcher(m)
    t0 = time.perf_counter()
    path, sha = patcher.save(b, copy, root)
    patch_s = time.perf_counter() - t0
    patcher.close()
    full = sha256_folder(index)
    copy_bytes = sum(p.stat().st_size for p in index.iterdir())
    b.file, b.sha256 = str(path.resolve()), sha
    reg.complete(b)  # the buyer now names its patch (same sha256 as the folder it was issued as)
    reg.close()
    return {"copy_bytes": copy_bytes, "patch_bytes": path.stat().st_size,
            "percent": 100 * path.stat().st_size / copy_bytes, "sha256_matches_full_copy": sha == full,
            "patch_seconds": patch_s}


def sha256_folder(folder: Path) -> str:
    from wmtrace.modelio import sha256_file

    return sha256_file(folder)


def speed(args: argparse.Namespace) -> dict:
    """Materialize the 1.1B copy (5 shards) against copying its files, alternating, best of `repeat`."""
    import bench_stream

    from wmtrace import api
    from wmtrace.registry import Registry

    root = args.dir / "llama"
    reg = Registry(root / "registry")
    b = reg.buyers(bench_stream.MASTER)[0]
    assert b.file.endswith(".wmpatch"), "run `sizes` first: it writes the 1.1B copy's patch"
    src, times = root / "leaked", {"materialize": [], "copyfile": []}
    for _ in range(args.repeat):
        dest = args.dir / "copied"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        t0 = time.perf_counter()
        for p in sorted(src.iterdir()):
            shutil.copyfile(p, dest / p.name)
        for p in dest.iterdir():  # the same durability as materialize, which fsyncs each file
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        times["copyfile"].append(time.perf_counter() - t0)
        shutil.rmtree(dest)
        out = args.dir / "materialized"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        r = api.materialize(reg, b.name, out)
        times["materialize"].append(time.perf_counter() - t0)
        assert r["sha256"] == b.sha256
        shutil.rmtree(out)
    size = sum(p.stat().st_size for p in src.iterdir())
    best = {k: min(v) for k, v in times.items()}
    return {"bytes": size, "seconds": times, "best": best,
            "mb_per_s": {k: size / v / 1e6 for k, v in best.items()},
            "materialize_vs_copy": best["copyfile"] / best["materialize"]}


def issue(args: argparse.Namespace) -> dict:
    from wmtrace import api

    reg = minilm_registry(args.registry)
    out = args.dir / "issued"
    start, cpu, done, rounds = time.perf_counter(), time.process_time(), len(reg.buyers("minilm")), []
    first = done
    result: dict = {}
    while done - first < args.buyers:
        n = min(args.check_every, args.buyers - (done - first))
        t0 = time.perf_counter()
        quick = api.issue(reg, buyers=n - 1, out=out, master="minilm", eval_samples=0, store="patch") if n > 1 else []
        checked = api.issue(reg, buyers=1, out=out, master="minilm", eval_samples=args.eval_samples, store="patch")
        done += n
        b = checked[0]
        rounds.append({"buyers": n, "seconds": time.perf_counter() - t0, "checked": b.name, "cosine": b.cosine,
                       "retrieval_agreement": b.agreement,
                       "timings_unchecked": quick[-1].extra.get("timings") if quick else None,
                       "timings_checked": b.extra.get("timings")})
        elapsed = time.perf_counter() - start
        per = elapsed / (done - first)
        patches_bytes = du(out)
        result = {"buyers_issued": done - first, "seconds": elapsed, "seconds_per_buyer": per,
                  "cpu_seconds_per_buyer": (time.process_time() - cpu) / (done - first),
                  "patch_bytes_on_disk": patches_bytes, "registry_bytes_on_disk": du(args.registry),
                  "bytes_per_buyer": patches_bytes / (done - first),
                  "projected_hours_for": {str(args.buyers): per * args.buyers / 3600},
                  "projected_patch_gb_for": {str(args.buyers): patches_bytes / (done - first) * args.buyers / 1e9},
                  "check_every": args.check_every, "eval_samples": args.eval_samples, "rounds": rounds}
        write(args, {"issue": result})
        print(f"{done - first} buyers, {elapsed:.0f} s, {per:.2f} s/buyer, {patches_bytes / 1e6:.1f} MB", flush=True)
    return result


def write(args: argparse.Namespace, data: dict) -> None:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    write_json(args.out, {"benchmark": "patches", "mode": args.mode, "commit": head,
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          "machine": f"{os.cpu_count()}-core {os.uname().machine}, no GPU", **data})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("sizes", "speed", "issue"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/patches.json"))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wmtrace-bench-patches"))
    ap.add_argument("--registry", type=Path, default=Path("/tmp/wmtrace-bench-patches/minilm"))
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--check-every", type=int, default=100)
    ap.add_argument("--eval-samples", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    data = {"sizes": sizes, "speed": speed, "issue": issue}[args.mode](args)
    write(args, {args.mode: data})
    print(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
