"""`issue`: buyer copies. Reserve IDs, mark, verify by tracing, measure, write, record.

Each copy is written atomically and recorded only after it traces back to its own buyer; a process
killed mid-run leaves reservations that the next run takes over (`Registry.reserve`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import failpoint, fidelity, formats, modelio, schemes, targets
from ..coding import codes
from ..errors import BadArgument, BadInput, SelfCheckFailed
from ..evidence.statement import date
from ..registry import Buyer, Master, Registry
from . import evidence, images, patches
from .query import query_target
from .register import ensure_example
from .trace import trace_tensors

# (buyers done, buyer count, repair step, repair steps, smallest bit margin) -> None; called during
# repair and once after each buyer is issued (then with the buyer's final margin).
Progress = Callable[[int, int, int, int, float], None]
# Buyer names become file names (NAME.safetensors, and a hidden temporary beside it): one path
# component, printable, short enough for any file system's 255-byte limit with room to spare.
MAX_BUYER_NAME = 100
# Times a copy below the fidelity target is marked again at 1/sqrt(2) of the strength (down to half):
# its soft bits then read about 0.5-0.7 instead of 1, still far above the reference attack's losses.
BACKOFF_STEPS = 2


def check_buyer_name(name: str) -> None:
    """Refuse a buyer name that would not be a single, visible file name in the output folder."""
    if not name:
        raise BadInput("buyer names must be non-empty")
    if len(name.encode()) > MAX_BUYER_NAME:
        raise BadInput(f"buyer name {name[:40]!r}...: longer than {MAX_BUYER_NAME} bytes")
    if name.startswith(".") or any(ch in "/\\" or not ch.isprintable() for ch in name):
        raise BadInput(f"buyer name {name!r}: no '/', '\\', control characters or leading '.'")


def check_issue(buyers: int | None, names: list[str] | None, eval_samples: int | None) -> list[str | None]:
    """The names to issue (None: a generated one), or BadInput: every check `issue` can make before
    it touches the registry, so that a bad request changes nothing."""
    if eval_samples is not None and eval_samples < 0:
        raise BadArgument("eval_samples", "must be 0 or more")
    if names is None:
        if buyers is None or buyers < 1:
            raise BadArgument("buyers", "must be at least 1")
        return [None] * buyers
    if buyers is not None and buyers != len(names):
        raise BadArgument("buyers", f"{buyers} does not match the {len(names)} names given")
    wanted = [n.strip() for n in names]
    if len(set(wanted)) != len(wanted):
        raise BadInput("buyer names must be unique")
    for n in wanted:
        check_buyer_name(n)
    return wanted


def issue(
    reg: Registry,
    buyers: int | None = None,
    names: list[str] | None = None,
    out: str | os.PathLike | None = None,
    master: str | None = None,
    progress: Progress | None = None,
    seed: int | None = None,
    eval_samples: int | None = None,
    ray: str | bool | None = None,
    store: str = "full",
    ray_workers: int | None = None,
    allow_revealed: bool = False,
) -> list[Buyer]:
    """Issue buyer copies; returns those issued by this call.

    `buyers=N` issues N more copies (a killed run's reservations count among them); a `names` list is
    idempotent: names already issued are skipped. `eval_samples` overrides how many held-out samples
    measure each copy's fidelity (the master's setting by default: all); 0 skips the measurement, the
    largest cost per buyer. `ray` issues on a Ray cluster (True: `ray.init()`, else its address) with
    `ray_workers` actors (one per CPU by default); see `pipeline.distributed`. `store="patch"` writes
    BUYER.wmpatch, only what differs from the master, instead of the copy (`pipeline.patches`; the
    buyer's sha256 is still the full copy's, which `materialize` rebuilds).
    """
    wanted = check_issue(buyers, names, eval_samples)
    patches.check_store(store)
    if ray:  # Ray and the module that uses it are imported only here
        from . import distributed

        distributed.check(ray, ray_workers)
    m = reg.master(master) if master or reg.masters() else ensure_example(reg)
    patches.check_store(store, m)
    if not allow_revealed:
        refuse_revealed(reg, m)
    if names is not None:
        have = {b.name for b in reg.buyers(m.name)}
        wanted = [n for n in wanted if n not in have]
        if not wanted:
            return []
    out = Path(out) if out is not None else Path.cwd() / "buyers" / m.name
    formats.writable_folder(out)
    if ray:
        done = distributed.issue_on_ray(reg, m, wanted, out, ray, functools.partial(_Run, store=store), seed=seed,
                                        eval_samples=eval_samples, progress=progress, workers=ray_workers)
        evidence.publish(reg, m.name, done, out)
        return done
    run = _Run(reg, m, eval_samples, store)
    reserved = reg.reserve(m.name, wanted)
    failpoint.reached("issue:reserved")
    done: list[Buyer] = []
    try:
        for i, b in enumerate(reserved):
            step_cb = (lambda s, n, h, i=i: progress(i, len(reserved), s, n, h)) if progress else None
            run.one(b, out, seed if seed is not None else b.id, step_cb)
            failpoint.reached("issue:written")
            reg.complete(b)
            failpoint.reached("issue:completed")
            done.append(b)
            if progress is not None:
                progress(len(done), len(reserved), 1, 1, b.margin)
    except BaseException:
        reg.release(m.name, [b.id for b in reserved if b.status != "issued"])
        raise
    evidence.publish(reg, m.name, done, out)
    return done


def refuse_revealed(reg: Registry, m: Master) -> None:
    """A master whose key went out in an evidence bundle marks no new copy: whoever holds the bundle can
    strip that master's marks. The rotation is a new registration of the same weights (a new key)."""
    r = reg.revealed(m.name)
    if r is not None:
        raise BadInput(f"the key of master {m.name!r} was revealed in an evidence bundle ({date(r['at'])}): "
                       f"its marks can be stripped by whoever holds the bundle; register the weights again for new "
                       f"copies (wmtrace init --name NEW --weights {m.weights} --model {m.factory}"
                       f"{f' --data {m.data}' if m.data else ''}), or pass --allow-revealed")


class _Run:
    """What every copy of one master shares in an issuing run, computed once: the master model, each
    scheme's marker, the held-out data and the master's outputs on it."""

    def __init__(self, reg: Registry, m: Master, eval_samples: int | None, store: str = "full"):
        start = time.perf_counter()
        self.reg, self.m = reg, m
        self.key = reg.key(m.name)
        model, self.extras = modelio.build(m)
        train = modelio.dataset(m.data, "train")
        master = schemes.MasterModel(model, dict(model.state_dict()), train, None)
        self.master = master
        stored = reg.stored(m)
        # Schemes that edit a model's inside come before those that edit its output layer, which solve
        # their edit on the features the earlier marks leave (`Scheme.stage`).
        names = sorted(m.config.schemes, key=lambda n: schemes.get(n).stage)
        self.markers = [schemes.get(name).issuer(master, m, m.config.schemes[name], self.key, stored)
                        for name in names]
        # The output-image self-check reads each copy against the master's outputs: computed once here.
        self.image_reader = images.master_reader(reg, m, model) if "images" in m.config.schemes else None
        self.dtypes = {k: getattr(torch, v) for k, v in m.config.dtypes.items()}
        self.template = None  # a GGUF master's metadata, read when the first copy is written
        self.patcher = patches.Patcher(m) if store == "patch" else None  # the master's file, mapped once
        limit = m.config.eval_samples if eval_samples is None else eval_samples
        self.test = modelio.dataset(m.data, "test") if limit != 0 else None
        self.limit = limit
        # Held-out data is streamed for every copy, never held: only outputs are kept (a split of
        # 224 x 224 crops would otherwise dominate the run's memory).
        self.master_out, self.labels = (fidelity.stream_outputs(model, modelio.stream(self.test, limit),
                                                                m.config.output)
                                        if self.test is not None else (None, None))
        self.load_s = time.perf_counter() - start  # paid once per process (per Ray actor)

    def one(self, b: Buyer, out: Path, seed: int, progress) -> None:
        """Mark, check and write one copy; fills in `b` (file, sha256, margin, fidelity, codeword).

        A copy below the master's fidelity target is marked again, weaker by sqrt(2), at most
        `BACKOFF_STEPS` times: `init` chose the strength on a trial codeword, and on EfficientNet-Lite0
        another codeword at the same strength agreed 1 point less (BENCHMARKS.md, *1000-class copies*)."""
        m = self.m
        laps = _Laps()
        bits = codes.codeword(self.key, m.name, b.id, m.config.code)
        scale = 1.0
        for attempt in range(BACKOFF_STEPS + 1):
            model, final = self._mark(bits, seed, progress, scale)
            b.margin = min(marker.margin(model, bits) for marker in self.markers)
            laps.lap("place")
            if self.test is None:
                break
            ours, _ = fidelity.stream_outputs(model, modelio.stream(self.test, self.limit), m.config.output)
            _measure(b, ours, self.master_out, self.labels, m.config.output)
            laps.lap("fidelity")
            if _meets(b, m) or attempt == BACKOFF_STEPS:
                break
            scale /= math.sqrt(2.0)
        _gate(b, m)
        try:
            _verify(self.reg, m, b, final, model, self.image_reader)
        except SelfCheckFailed as e:
            if scale == 1.0:
                raise
            raise SelfCheckFailed(f"{e}; the copy was marked at {scale:.2f} of the strength to meet the fidelity "
                                  f"target {m.config.fidelity:g}: register the master again with a lower --fidelity"
                                  ) from e
        laps.lap("self_trace")
        digest = None
        if self.patcher is not None:  # the copy's sha256 from its bytes in memory, never written whole
            path, digest = self.patcher.save(b, final, out)
        elif m.config.format == "gguf":
            path = out / f"{b.name}.gguf"
            arrays = {k: v.float().numpy() for k, v in final.items() if v.is_floating_point()}
            if self.template is None:  # parsed once per run: the tokenizer's metadata takes seconds
                self.template = formats.gguf.open_reader(self.reg.template_path(m.weights))
            formats.gguf.save_gguf(arrays, self.template, path, m.config.quants)
        elif m.config.shards > 1:
            path = out / b.name
            formats.save_sharded(final, path, m.config.shards)
        else:
            path = out / f"{b.name}.safetensors"
            formats.save_safetensors(final, path)
        b.file, b.sha256, b.status = str(path.resolve()), digest or modelio.sha256_file(path), "issued"
        b.codeword = np.packbits(bits).tobytes().hex()
        laps.lap("write")
        b.extra["timings"] = dict(laps)


    def _mark(self, bits: np.ndarray, seed: int, progress, scale: float) -> tuple[torch.nn.Module, dict]:
        """A marked copy: the model (float, as written) and the tensors to write (in the master's dtypes)."""
        model = modelio.import_object(self.m.factory)()
        model.load_state_dict(self.master.model.state_dict(), strict=False)
        model.eval()  # a scheme that runs the copy (the black-box edit) must see the master's BatchNorm statistics
        for marker in self.markers:
            marker.embed(model, bits, seed, progress, scale)
        final = self.extras | {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        final = {k: v.to(self.dtypes[k]) if k in self.dtypes else v for k, v in final.items()}
        if self.m.config.quants:  # a GGUF master's copy keeps its types: marked weights move whole grid steps
            master = self.master.state
            final |= {k: torch.from_numpy(formats.grids.snap(master[k].numpy(), v.numpy(), q))
                      for k, v in final.items() if (q := self.m.config.quants.get(k)) and formats.grids.on_grid(q)
                      and not torch.equal(v, master[k])}
        # Margin, self-check and fidelity of the copy as written (after any rounding to fp16/bf16 or to a
        # GGUF master's grid).
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in final.items()}, strict=False)
        return model, final


class _Laps(dict):
    """Seconds per step of one copy (place, fidelity, self_trace, write), kept in `Buyer.extra["timings"]`
    (never stored): where issuing time goes, for `benchmarks/bench_ray.py` to project a cluster's rate."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self[step] = self.get(step, 0.0) + now - self.last
        self.last = now


def _measure(b: Buyer, ours: torch.Tensor, master: torch.Tensor, labels: torch.Tensor | None, output: str) -> None:
    """Fidelity of a copy: classifiers top-1 agreement (and accuracy with labels); encoders mean
    cosine similarity and top-1 nearest-neighbour retrieval agreement (stored as agreement); language
    models next-token top-1 agreement (perplexity is measured by benchmarks/bench_smollm2.py)."""
    if output == "tokens":
        b.agreement = fidelity.token_fidelity(ours, master)[0]
        return
    if output == "embedding":
        b.cosine, b.agreement = fidelity.embedding_fidelity(ours, master)
        return
    predicted = ours.argmax(1)
    b.agreement = float((predicted == master.argmax(1)).float().mean())
    b.accuracy = float((predicted == labels).float().mean()) if labels is not None else None


def _meets(b: Buyer, m: Master) -> bool:
    target = m.config.fidelity
    value = b.cosine if m.config.output == "embedding" else b.agreement
    return target is None or value is None or value >= target


def _gate(b: Buyer, m: Master) -> None:
    """No copy below the master's fidelity target leaves: `init --fidelity` chose the strength to meet
    it on the same held-out data, but each copy's codeword moves its answers differently."""
    if not _meets(b, m):
        value = b.cosine if m.config.output == "embedding" else b.agreement
        target = m.config.fidelity
        what = {"embedding": "mean cosine", "tokens": "next-token agreement"}.get(m.config.output, "top-1 agreement")
        raise SelfCheckFailed(f"buyer {b.name!r}: {what} with the master {value:.4f} is below the fidelity target "
                              f"{target:g} of master {m.name!r}; no copy was written (register the master again "
                              "with a lower --strength or --fidelity)")


def _verify(reg: Registry, m: Master, b: Buyer, state: dict[str, torch.Tensor], model: torch.nn.Module,
            image_reader=None) -> None:
    """Trace the copy before it leaves: a copy that would not name its buyer is never issued. With
    the black-box scheme it must also name its buyer from its top-1 labels alone (the least a
    server reveals), read as `query` reads an endpoint; with the output-image scheme, from its output on
    one probe."""
    if "whitebox" in m.config.schemes:
        arrays = {k: v.float().numpy() for k, v in state.items() if v.is_floating_point()}
        _check(b, trace_tensors(arrays, reg, master=m.name, pending=[b]), "embedded")
    if "blackbox" in m.config.schemes:
        target = targets.ModuleTarget(model, f"copy of {b.name}", reveal="top1")
        _check(b, query_target(target, reg, m.name, pending=[b]), "black-box")
    if "images" in m.config.schemes:  # from one output image, as it would be saved (8-bit)
        outputs = images.run_model(model, reg, m.name)[:1]
        _check(b, images.trace_images(outputs, reg, m.name, name=f"copy of {b.name}", pending=[b], log=False,
                                      reader=image_reader), "output-image")


def _check(b: Buyer, result, what: str) -> None:
    if result.verdict != "identified" or result.buyer is None or result.buyer["id"] != b.id:
        raise SelfCheckFailed(f"buyer {b.name!r}: the {what} mark did not verify ({result.reason or result.verdict})")
