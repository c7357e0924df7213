"""Peak memory and time of tracing a ~1B-parameter sharded checkpoint, against reading it once.

    PYTHONPATH=. python benchmarks/bench_stream.py --out benchmarks/results/stream.json
    PYTHONPATH=. python benchmarks/bench_stream.py --renamed --permute-carriers --skip-eager \
        --out benchmarks/results/stream_renamed.json

Writes a random Llama-shaped checkpoint (TinyLlama-1.1B's shapes by default: hidden 2048,
intermediate 5632, 22 layers, grouped-query k/v of 256 rows, vocabulary 32000, bfloat16) as
Hugging Face ships it (shards + model.safetensors.index.json), registers it as a master with two
k_proj carriers and minimal-norm placement, and writes one buyer copy. Issuing goes through the
lower-level pieces (carriers, embed.place, codes), since `api.issue` builds a float32 module per copy.

Each measurement runs in a fresh subprocess, which reports its own peak resident memory (VmHWM of
/proc/self/status: unlike ru_maxrss it does not inherit the parent's high-water mark across exec):
reading the copy once (plain file reads; safe_open + get_tensor + float32 of every tensor, each dropped
before the next), tracing with the streaming path (`wmtrace.pipeline.trace.trace`), and the eager path
(`formats.load_tensors` of the whole copy, then `trace_tensors`). The page cache is warm: the files
were just written, so reading measures memory bandwidth and conversion, not the disk.

With --renamed, the copy is also written with every tensor renamed (`rename`: shard headers and index
rewritten, bytes unchanged), so no carrier is where its name says and every tensor of a carrier's
shape is a candidate; it is traced with the screen before the full match (`trace-renamed`) and with
`align.locate` as it was before the screen (`trace-renamed-before`, commit BEFORE), and the screen's
rank of each true carrier is recorded (`screen-renamed`). --permute-carriers adds a renamed copy
whose carriers' rows and input channels are shuffled as well.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_json  # noqa: E402

MASTER = "llama"
STEPS = ("make", "baseline", "read-file", "read-safe-open", "trace-stream", "trace-eager")
RENAMED_STEPS = ("rename", "screen-renamed", "trace-renamed", "trace-renamed-before")  # with --renamed
BEFORE = "84c27cf"  # the last commit whose align.locate has no screen (trace-renamed-before)


def renamed_dir(root: Path, permute: bool) -> Path:
    """The renamed copy's folder, beside "leaked"."""
    return root / ("renamed-permuted" if permute else "renamed")


def llama_shapes(layers: int, hidden: int, intermediate: int, kv: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes in the order Hugging Face's Llama writes them."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int):
    """Random weights (std 0.02, norms at 1) in bfloat16, as a released checkpoint stores them."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g).mul_(0.02)
        state[name] = t.to(torch.bfloat16)
    return state


def make(root: Path, args: argparse.Namespace) -> dict:
    """The master registered in root/registry and one buyer copy in root/leaked, issued as `api` would."""
    import numpy as np

    from wmtrace import formats
    from wmtrace.coding import codes, keys
    from wmtrace.modelio import sha256_file
    from wmtrace.registry import Master, MasterConfig, Registry
    from wmtrace.schemes.whitebox import NAME, Config, embed
    from wmtrace.schemes.whitebox import carriers as carriers_mod

    shapes = llama_shapes(args.layers, args.hidden, args.intermediate, args.kv, args.vocab)
    state = random_state(shapes, seed=0)
    spec = codes.CodeSpec(symbols=args.bits // 8)
    names = [f"model.layers.{i}.self_attn.k_proj.weight" for i in args.carrier_layers]
    chosen = carriers_mod.select(state, spec.bits, names)
    cfg = embed.EmbedConfig(steps=0, placement="minimal-norm")
    margins = tuple(embed.margin(state[c.name], c, cfg.strength) for c in chosen)
    config = MasterConfig(spec, {NAME: Config(tuple(chosen), margins, cfg).to_dict()}, eval_samples=0)
    reg = Registry(root / "registry", create=True)
    with reg.lock():  # creates the registry; one registration at a time, as `init` does
        weights = reg.weights_path(MASTER)
        formats.save_safetensors(state, weights)
        key = keys.generate()
        keys.write(reg.key_path(MASTER), key)
        reg.add_master(Master(MASTER, weights, sha256_file(weights), "none:none", None, config,
                              keys.fingerprint(key), None))

    (b,) = reg.reserve(MASTER, ["leaker"])
    bits = codes.codeword(key, MASTER, b.id, spec)
    embed.place(state, chosen, [c.secret(key) for c in chosen], list(margins), bits)  # in place, bfloat16 kept
    formats.save_sharded(state, root / "leaked", args.shards)
    index = root / "leaked" / "model.safetensors.index.json"
    b.file, b.sha256, b.status = str(index.parent), sha256_file(index), "issued"
    b.codeword = np.packbits(bits).tobytes().hex()
    reg.complete(b)
    reg.close()
    return {
        "parameters": sum(math.prod(s) for s in shapes.values()),
        "tensors": len(shapes),
        "bytes": sum(p.stat().st_size for p in (root / "leaked").glob("*.safetensors")),
        "shards": len(list((root / "leaked").glob("*.safetensors"))),
        "carriers": names,
        "buyer": {"id": b.id, "name": b.name},
    }


def new_name(name: str) -> str:
    """The name another exporter would give: GPT-style block names, every tensor renamed."""
    for old, new in (("model.layers.", "transformer.h."), ("self_attn.", "attn."), ("_proj", ""), ("mlp.", "ffn."),
                     ("model.", "transformer."), ("_layernorm", "_ln")):
        name = name.replace(old, new)
    return name


def rename(root: Path, permute: bool) -> dict:
    """root/leaked copied to `renamed_dir` with every tensor renamed (`new_name`): only the shards'
    headers and the index are rewritten, the bytes are copied as they are. With `permute`, each
    carrier's rows and input channels are also shuffled, so neither its name nor its order helps."""
    import numpy as np

    from wmtrace.registry import Registry
    from wmtrace.schemes.whitebox import NAME, Config

    with Registry(root / "registry") as reg:
        carriers = [c.name for c in Config.from_dict(reg.master(MASTER).config.schemes[NAME]).carriers]
    src, dst = root / "leaked", renamed_dir(root, permute)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    rng = np.random.default_rng(7)
    for shard in sorted(src.glob("*.safetensors")):
        data = shard.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        body = bytearray(data[8 + n:])
        for name in [k for k in header if k in carriers and permute]:
            (a, b), shape = header[name]["data_offsets"], header[name]["shape"]
            w = np.frombuffer(bytes(body[a:b]), dtype=np.uint16).reshape(shape)  # bfloat16 bits, moved whole
            body[a:b] = np.ascontiguousarray(w[rng.permutation(shape[0])][:, rng.permutation(shape[1])]).tobytes()
        head = json.dumps({(k if k == "__metadata__" else new_name(k)): v for k, v in header.items()}).encode()
        head += b" " * (-len(head) % 8)
        (dst / shard.name).write_bytes(len(head).to_bytes(8, "little") + head + bytes(body))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"] = {new_name(k): v for k, v in index["weight_map"].items()}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"carriers_as": [new_name(c) for c in carriers], "permuted": permute}


def read_file(folder: Path) -> dict:
    """Every byte of every shard through one 64 MiB buffer: the floor for any reader."""
    buf = bytearray(64 << 20)
    n = 0
    for p in sorted(folder.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while k := f.readinto(buf):
                n += k
    return {"bytes": n}


def read_safe_open(folder: Path) -> dict:
    """Every tensor once with safe_open + get_tensor, made float32 (what tracing computes on) and dropped
    before the next. get_tensor alone maps the file without touching it, so it would measure nothing."""
    import torch
    from safetensors import safe_open

    n = 0
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(name).to(torch.float32)
                n += t.numel()
                del t
    return {"elements": n}


def trace_stream(root: Path) -> dict:
    from wmtrace.pipeline import trace
    from wmtrace.registry import Registry

    with Registry(root / "registry") as reg:
        r = trace.trace(root / "leaked", reg)
    return {"verdict": r.verdict, "buyer": r.buyer, "bit_errors": r.bit_errors, "carriers": r.carriers}


def trace_renamed(root: Path, permute: bool, before: bool = False) -> dict:
    """The streaming trace of the renamed copy: no carrier is where its name says, so every tensor of a
    carrier's shape (the 44 k_proj and v_proj weights) is a candidate. `before`: with `align.locate`
    as of commit BEFORE, without the screen (imported from git beside the current code)."""
    from wmtrace.pipeline import trace
    from wmtrace.registry import Registry
    from wmtrace.schemes.whitebox import align, scheme

    if before:
        import types

        src = subprocess.run(["git", "show", f"{BEFORE}:wmtrace/schemes/whitebox/align.py"], check=True,
                             capture_output=True, text=True, cwd=Path(__file__).resolve().parent).stdout
        old = types.ModuleType("wmtrace.schemes.whitebox.align_before")
        old.__package__ = "wmtrace.schemes.whitebox"
        sys.modules[old.__name__] = old  # dataclasses look their module up there
        exec(compile(src, f"align@{BEFORE}", "exec"), old.__dict__)
        scheme.locate = old.locate
    calls: list[int] = []
    mod = old if before else align
    real = mod._match
    mod._match = lambda *a, **k: calls.append(1) or real(*a, **k)
    with Registry(root / "registry") as reg:
        r = trace.trace(renamed_dir(root, permute), reg)
    return {"verdict": r.verdict, "buyer": r.buyer, "bit_errors": r.bit_errors, "carriers": r.carriers,
            "full_matches": len(calls), "before": BEFORE if before else None}


def screen_renamed(root: Path, permute: bool) -> dict:
    """Each carrier's rank on the screen (`screen.rank`) in the renamed copy: the true tensor's, and the
    best and the number passing of the other candidates (the false-reject measurement at this size)."""
    import numpy as np

    from wmtrace import formats
    from wmtrace.registry import Registry
    from wmtrace.schemes.whitebox import NAME, Config, align, screen
    from wmtrace.schemes.whitebox.extract import master_arrays

    with Registry(root / "registry") as reg:
        m = reg.master(MASTER)
    carriers = list(Config.from_dict(m.config.schemes[NAME]).carriers)
    arrays = master_arrays(m, [c.name for c in carriers])
    tensors = formats.open_tensors(renamed_dir(root, permute))
    out = []
    for c in carriers:
        sk = screen.sketch(arrays[c.name].astype(np.float64).reshape(c.shape[0], c.shape[1], -1))
        ranks = {name: max(screen.rank(v, sk) for v in align._views(align._finite(tensors[name]), c))
                 for name, shape in tensors.shapes.items() if align._orientations(shape, c)}
        true = ranks.pop(new_name(c.name))
        out.append({"carrier": c.name, "true_rank": round(true, 3), "rejected": bool(true < screen.MARGIN),
                    "others": len(ranks), "best_other_rank": round(max(ranks.values()), 3),
                    "others_passing": int(sum(r >= screen.MARGIN for r in ranks.values()))})
    return {"margin": screen.MARGIN, "carriers": out}


def trace_eager(root: Path) -> dict:
    """The file read whole as float32 first (what `trace` did before streaming), then traced."""
    from wmtrace import formats
    from wmtrace.pipeline import trace
    from wmtrace.registry import Registry

    t0 = time.perf_counter()
    tensors = formats.load_tensors(root / "leaked")
    load_s = time.perf_counter() - t0
    with Registry(root / "registry") as reg:
        r = trace.trace_tensors(tensors, reg, str(root / "leaked"))
    return {"verdict": r.verdict, "buyer": r.buyer, "bit_errors": r.bit_errors, "load_tensors_s": round(load_s, 2)}


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)  # kB
    return float("nan")


def child(step: str, root: Path, args: argparse.Namespace) -> None:
    """One step in this (fresh) process: its time and this process's peak memory, as JSON."""
    import numpy  # noqa: F401 - imported by every step, so the baseline holds them too
    import torch  # noqa: F401

    work = {
        "make": lambda: make(root, args),
        "baseline": lambda: {},
        "read-file": lambda: read_file(root / "leaked"),
        "read-safe-open": lambda: read_safe_open(root / "leaked"),
        "trace-stream": lambda: trace_stream(root),
        "trace-eager": lambda: trace_eager(root),
        "rename": lambda: rename(root, args.permute_carriers),
        "trace-renamed": lambda: trace_renamed(root, args.permute_carriers),
        "trace-renamed-before": lambda: trace_renamed(root, args.permute_carriers, before=True),
        "screen-renamed": lambda: screen_renamed(root, args.permute_carriers),
    }[step]
    t0 = time.perf_counter()
    out = work()
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(out))


def run_child(step: str, root: Path, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--child", step, "--dir", str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(step, result, flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/stream.json"))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/wmtrace-bench-stream"))
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--kv", type=int, default=256, help="rows of k_proj / v_proj (grouped-query attention)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--bits", type=int, default=256)
    ap.add_argument("--carrier-layers", type=int, nargs="+", default=[3, 17])
    ap.add_argument("--skip-eager", action="store_true", help="leave out the eager trace (float32 copy in memory)")
    ap.add_argument("--renamed", action="store_true",
                    help="also trace a copy with every tensor renamed (the search over same-shaped tensors), with "
                         "the screen and without it (align.locate of commit BEFORE)")
    ap.add_argument("--permute-carriers", action="store_true",
                    help="with --renamed, also a renamed copy whose carriers' rows and input channels are shuffled")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and registry in --dir")
    ap.add_argument("--child", choices=STEPS + RENAMED_STEPS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dir, args)
        return

    if args.dir.exists():
        shutil.rmtree(args.dir)
    shape_args = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("layers", "hidden", "intermediate", "kv",
                                                                         "vocab", "shards", "bits")]
    shape_args += ["--carrier-layers", *map(str, args.carrier_layers)]
    try:
        made = run_child("make", args.dir, shape_args)
        steps = [s for s in STEPS[1:] if not (s == "trace-eager" and args.skip_eager)]
        results = {s: run_child(s, args.dir, shape_args) for s in steps}
        for permute in (False, True)[: (1 + args.permute_carriers) * args.renamed]:
            tag = "-permuted" if permute else ""
            for s in RENAMED_STEPS:
                results[s + tag] = run_child(s, args.dir, shape_args + ["--permute-carriers"] * permute)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)

    read, stream = results["read-safe-open"], results["trace-stream"]
    ratios = {
        "trace_stream_over_read_seconds": round(stream["seconds"] / read["seconds"], 2),
        "trace_stream_over_read_peak_rss": round(stream["peak_rss_mib"] / read["peak_rss_mib"], 2),
    }
    if "trace-eager" in results:
        eager = results["trace-eager"]
        ratios["trace_eager_over_stream_seconds"] = round(eager["seconds"] / stream["seconds"], 2)
        ratios["trace_eager_over_stream_peak_rss"] = round(eager["peak_rss_mib"] / stream["peak_rss_mib"], 2)
    for tag in ("", "-permuted"):
        if "trace-renamed" + tag in results:
            after, before = results["trace-renamed" + tag], results["trace-renamed-before" + tag]
            ratios[f"trace_renamed{tag}_over_before_seconds"] = round(after["seconds"] / before["seconds"], 3)
            ratios[f"trace_renamed{tag}_over_stream_seconds"] = round(after["seconds"] / stream["seconds"], 2)
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU",
        "python": platform.python_version(),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "checkpoint": {**made, "config": {k: getattr(args, k) for k in
                                          ("layers", "hidden", "intermediate", "kv", "vocab", "shards", "bits")}},
        "results": results,
        "ratios": ratios,
    }
    write_json(args.out, report, newline=True)
    print(json.dumps(ratios))


if __name__ == "__main__":
    main()
