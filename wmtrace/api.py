"""The Python API: what the CLI does, callable from distribution scripts.

    from wmtrace import api
    reg = api.open_registry("registry", create=True)
    api.init(reg, "my-model", "master.safetensors", "mypkg.models:build", data="mypkg.data:dataset")
    buyers = api.issue(reg, buyers=10, out="copies/")
    result = api.trace("leaked.onnx", reg)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from . import batches, codes, embed, failpoint, fidelity, formats, keys, modelio
from . import carriers as carriers_mod
from .errors import BadArgument, BadInput, SelfCheckFailed
from .registry import Buyer, Master, Registry
from .trace import load_moments, trace_tensors
from .trace import trace as _trace

EXAMPLE_MASTER = "fashion-cnn"
EXAMPLE_FACTORY = "wmtrace.example:build"
EXAMPLE_DATA = "wmtrace.example:dataset"
PLACEMENTS = ("activation", "minimal-norm")
# Training inputs on which candidate carrier layers are ranked by what a mark there costs.
COST_SAMPLES = 64

# (buyers done, buyer count, repair step, repair steps, smallest bit margin) -> None; called during
# repair and once after each buyer is issued (then with the buyer's final margin).
Progress = Callable[[int, int, int, int, float], None]


# Kept for scripts written against earlier releases; `wmtrace.modelio` is their home.
import_object, sha256_file, build_model = modelio.import_object, modelio.sha256_file, modelio.build_model


def open_registry(path: str | os.PathLike | None = None, create: bool = False) -> Registry:
    return Registry(path, create=create)


def init(
    reg: Registry,
    name: str,
    weights: str | os.PathLike,
    factory: str,
    data: str | None = None,
    carriers: list[str] | None = None,
    bits: int = 256,
    layers: int | None = None,
    strength: float = embed.EmbedConfig.strength,
    steps: int = embed.EmbedConfig.steps,
    eval_samples: int | None = None,
    placement: str = embed.EmbedConfig.placement,
    output: str = embed.EmbedConfig.output,
    loss: str | None = None,
) -> Master:
    """Register a master: copy its weights into the registry, choose carriers, create its key.

    `weights` may be a safetensors file, a sharded folder or index, an fp16/bf16 file or a plain
    checkpoint; tensors the model lacks (extra heads, adapters) are kept and copied to buyers
    unmarked. `output` says what the model returns ("logits" or "embedding"), which decides how
    fidelity is measured and repaired; `loss` (module:function(output, master_output)) overrides it.
    """
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise BadInput(f"master name {name!r}: use letters, digits, '-', '_' and '.'")
    if any(m.name == name for m in reg.masters()):
        raise BadInput(f"master {name!r} is already registered")
    spec = codes.CodeSpec(symbols=bits // 8)
    if placement not in PLACEMENTS:
        raise BadArgument("placement", f"{placement!r}: use one of {', '.join(PLACEMENTS)}")
    if output not in embed.OUTPUTS:
        raise BadArgument("output", f"{output!r}: use one of {', '.join(embed.OUTPUTS)}")
    if loss is not None:
        modelio.import_object(loss)
    if steps < 0:
        raise BadArgument("steps", "must be 0 or more")
    if not 0.0 < strength <= 1.0:
        raise BadArgument("strength", f"{strength}: use a value in (0, 1]")
    if layers is not None and layers < 1:
        raise BadArgument("layers", "must be at least 1")
    if bits % 8 or bits < 72:
        raise BadArgument("bits", f"{bits}: use a multiple of 8, at least 72")
    try:
        spec.validate()
    except ValueError as e:
        raise BadInput(str(e)) from e
    source = formats.open_tensors(weights)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in source.items()}

    # The model must build and accept the weights before anything is written.
    model = modelio.import_object(factory)()
    extras = modelio.load_into(model, state, f"{weights}: weights do not fit the model built by {factory}")
    model.eval()
    train = modelio.dataset(data, "train")
    test = modelio.dataset(data, "test")
    data_set = train if train is not None else test
    probe = modelio.tensors(data_set, COST_SAMPLES)[0] if data_set is not None else None  # a few real inputs
    sample = batches.take(probe, slice(0, 8)) if probe is not None else None
    try:
        used = carriers_mod.used_weights(model, sample) if sample is not None else list(model.state_dict())
    except (TypeError, RuntimeError, ValueError) as e:
        raise BadInput(f"{factory} does not run on the data of {data} ({formats._line(e)})") from e
    cfg = embed.EmbedConfig(strength=strength, steps=steps, placement=placement, output=output, loss=loss)
    moment_inputs = None
    if train is not None and placement == "activation":
        moment_inputs = modelio.tensors(train, cfg.moment_samples)[0]
    found: dict[str, np.ndarray | None] = {}

    def metrics(cands: list[carriers_mod.Carrier]) -> list[np.ndarray | None]:
        todo = [c for c in cands if c.name not in found]
        if todo and moment_inputs is not None:
            computed = embed.input_moments(model, todo, moment_inputs, cfg.ridge)
            found.update(zip([c.name for c in todo], computed, strict=True))
        return [found.get(c.name) for c in cands]

    def cost(cands: list[carriers_mod.Carrier]) -> list[float]:
        return embed.distortion(model, cands, metrics(cands), strength, probe, cfg)

    chosen = carriers_mod.select(state, spec.bits, carriers, count=layers, allowed=used,
                                 cost=cost if probe is not None else None)
    accuracy = None
    if test is not None and output == "logits":
        inputs, labels = modelio.tensors(test, eval_samples)
        if labels is not None:
            accuracy = fidelity.evaluate(model, inputs, labels)

    config = {
        "code": {"symbols": spec.symbols, "name": spec.name},
        "carriers": [
            {**c.to_dict(), "margin": embed.margin(state[c.name], c, strength)} for c in chosen
        ],
        "embed": asdict(cfg),
        "eval_samples": eval_samples,
        # Copies are written in the dtypes and shard count the master came in (fp16/bf16 stay half
        # size; a sharded Hugging Face folder gives sharded folders).
        "dtypes": source.dtypes,
        "shards": max(1, len(source.files)),
    }
    # The placement metric is fixed per master: issuing places marks with it, and tracing needs it to
    # recover a mark from the dimensions a structurally pruned copy has left.
    moments = {c.name: torch.from_numpy(mt) for c, mt in zip(chosen, metrics(chosen), strict=True) if mt is not None}
    registered = {k: state[k] for k in extras} | {k: v.contiguous() for k, v in model.state_dict().items()}
    with reg.lock():  # one registration at a time: the name is checked and taken under the lock
        if any(m.name == name for m in reg.masters()):
            raise BadInput(f"master {name!r} is already registered")
        return _register(reg, name, registered, moments, factory, data, config, accuracy)


def _register(reg: Registry, name: str, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor],
              factory: str, data: str | None, config: dict, accuracy: float | None) -> Master:
    """Write the master's files and its row; called under the registry lock, with the name free.

    A key file already there (left by a registration killed before its row was written) is used, not
    replaced: a key file is never deleted or overwritten, so no failure here can lose one. Files left
    by such a run are rewritten; on failure only files this call created are removed."""
    dest = reg.weights_path(name)
    moments_path = reg.moments_path(dest)
    created = [p for p in (dest, moments_path) if not p.exists()]
    try:
        formats.save_safetensors(weights, dest)
        failpoint.reached("init:weights")
        if moments:
            formats.save_safetensors(moments, moments_path)
        if reg.key_path(name).exists():
            key = reg.key(name)
        else:
            key = keys.generate()
            keys.write(reg.key_path(name), key)
        failpoint.reached("init:key")
        m = Master(name, dest, modelio.sha256_file(dest), factory, data, config, keys.fingerprint(key), accuracy)
        reg.add_master(m)
        failpoint.reached("init:registered")
    except BaseException:
        if not any(x.name == name for x in reg.masters()):
            for p in created:
                p.unlink(missing_ok=True)
        raise
    return m


def ensure_example(reg: Registry, epochs: int = 2, progress: Callable[[int, int], None] | None = None) -> Master:
    """The bundled Fashion-MNIST master, trained once and registered, for commands run with no setup.
    Under the registry lock: of two first runs at once, one trains and registers, the other waits."""
    with reg.lock():
        for m in reg.masters():
            if m.name == EXAMPLE_MASTER:
                return m
        from . import example

        trained = reg.cache_path(f"{EXAMPLE_MASTER}.safetensors")
        if not trained.exists():
            trained.parent.mkdir(mode=0o700, exist_ok=True)
            example.train_master(trained, epochs=epochs, progress=progress)
        return init(reg, EXAMPLE_MASTER, trained, EXAMPLE_FACTORY, EXAMPLE_DATA)


# Buyer names become file names (NAME.safetensors, and a hidden temporary beside it): one path
# component, printable, short enough for any file system's 255-byte limit with room to spare.
MAX_BUYER_NAME = 100


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


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".wmtrace-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BadInput(f"{out}: output folder is not writable ({e.strerror})") from e


def issue(
    reg: Registry,
    buyers: int | None = None,
    names: list[str] | None = None,
    out: str | os.PathLike | None = None,
    master: str | None = None,
    progress: Progress | None = None,
    seed: int | None = None,
    eval_samples: int | None = None,
) -> list[Buyer]:
    """Issue buyer copies: reserve IDs, embed, verify by tracing, write, record.

    `eval_samples` overrides how many held-out samples measure each copy's fidelity (the
    master's setting by default: all); 0 skips the measurement, the largest cost per buyer.

    Each copy is written atomically and recorded only after it traces back to its own buyer;
    a crash leaves a reservation that the next call completes.
    """
    wanted = check_issue(buyers, names, eval_samples)
    m = reg.master(master) if master or reg.masters() else ensure_example(reg)
    if names is not None:  # a names list is idempotent: names already issued are skipped
        have = {b.name for b in reg.buyers(m.name)}
        wanted = [n for n in wanted if n not in have]
        if not wanted:
            return []
    out = Path(out) if out is not None else Path.cwd() / "buyers" / m.name
    _check_writable(out)

    key = reg.key(m.name)
    model_master, extras = modelio.build(m)
    state_master = {k: v.clone() for k, v in model_master.state_dict().items()}
    dtypes = {k: getattr(torch, v) for k, v in m.config.get("dtypes", {}).items()}
    shards = int(m.config.get("shards", 1))
    cfg = embed.EmbedConfig(**m.config["embed"])
    if cfg.placement not in PLACEMENTS:
        raise BadInput(f"master {m.name!r}: unknown placement {cfg.placement!r} (activation, minimal-norm)")
    carriers = [carriers_mod.Carrier.from_dict(d) for d in m.config["carriers"]]
    margins = [d["margin"] for d in m.config["carriers"]]
    secrets = [c.secret(key) for c in carriers]
    spec = codes.CodeSpec(**m.config["code"])
    train = modelio.dataset(m.data, "train")
    stored = load_moments(m) if cfg.placement == "activation" else {}
    if train is None and (cfg.steps > 0 or (cfg.placement == "activation" and not stored)):
        raise BadInput(f"master {m.name!r} has no data entry point to fine-tune on")
    limit = m.config.get("eval_samples") if eval_samples is None else eval_samples
    test = modelio.dataset(m.data, "test") if limit != 0 else None
    held_out = modelio.tensors(test, limit) if test is not None else None
    master_out = fidelity.outputs(model_master, held_out[0]) if held_out is not None else None
    metrics = [None] * len(carriers)  # what the carriers see on real inputs: stored at init
    if cfg.placement == "activation":
        metrics = [stored.get(c.name) for c in carriers]
        if not stored:  # registered before the metric was stored with the master
            inputs = modelio.tensors(train, cfg.moment_samples)[0]
            metrics = embed.input_moments(model_master, carriers, inputs, cfg.ridge)
    maps = [carriers_mod.embedding_map(s, mt) for s, mt in zip(secrets, metrics, strict=True)]

    reserved = reg.reserve(m.name, wanted)
    failpoint.reached("issue:reserved")
    done: list[Buyer] = []
    try:
        for i, b in enumerate(reserved):
            bits = codes.codeword(key, m.name, b.id, spec)
            state = {k: v.clone() for k, v in state_master.items()}
            embed.place(state, carriers, secrets, margins, bits, maps=maps)
            model = modelio.import_object(m.factory)()
            model.load_state_dict(state, strict=False)
            if cfg.steps > 0:
                step_cb = (lambda s, h, i=i: progress(i, len(reserved), s, cfg.steps, h)) if progress else None
                data = modelio.shuffled_batches(train, cfg.batch_size, seed=(seed if seed is not None else b.id))
                embed.repair(model, model_master, data, carriers, secrets, margins, bits, cfg, step_cb)
            model.eval()
            final = extras | {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            final = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in final.items()}
            # Margin, self-check and fidelity of the copy as written (after any rounding to fp16/bf16).
            model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in final.items()},
                                  strict=False)
            b.margin = embed.min_margin(model, model_master, carriers, secrets, margins, bits)
            _verify(reg, m, b, final)
            if held_out is not None:
                _measure(b, fidelity.outputs(model, held_out[0]), master_out, held_out[1], cfg.output)
            if shards > 1:
                path = out / b.name
                formats.save_sharded(final, path, shards)
            else:
                path = out / f"{b.name}.safetensors"
                formats.save_safetensors(final, path)
            b.file, b.sha256, b.status = str(path.resolve()), modelio.sha256_file(path), "issued"
            b.codeword = np.packbits(bits).tobytes().hex()
            failpoint.reached("issue:written")
            reg.complete(b)
            failpoint.reached("issue:completed")
            done.append(b)
            if progress is not None:
                progress(len(done), len(reserved), cfg.steps, cfg.steps, b.margin)
    except BaseException:
        reg.release(m.name, [b.id for b in reserved if b.status != "issued"])
        raise
    return done


def _measure(b: Buyer, ours: torch.Tensor, master: torch.Tensor, labels: torch.Tensor | None, output: str) -> None:
    """Fidelity of a copy: classifiers top-1 agreement (and accuracy with labels); encoders mean
    cosine similarity and top-1 nearest-neighbour retrieval agreement (stored as agreement)."""
    if output == "embedding":
        b.cosine, b.agreement = fidelity.embedding_fidelity(ours, master)
        return
    predicted = ours.argmax(1)
    b.agreement = float((predicted == master.argmax(1)).float().mean())
    b.accuracy = float((predicted == labels).float().mean()) if labels is not None else None


def _verify(reg: Registry, m: Master, b: Buyer, state: dict[str, torch.Tensor]) -> None:
    """Trace the copy before it leaves: a copy that would not name its buyer is never issued."""
    arrays = {k: v.float().numpy() for k, v in state.items() if v.is_floating_point()}
    result = trace_tensors(arrays, reg, master=m.name, pending=[b])
    if result.verdict != "identified" or result.buyer is None or result.buyer["id"] != b.id:
        raise SelfCheckFailed(f"buyer {b.name!r}: the embedded mark did not verify ({result.reason or result.verdict})")


def trace(path: str | os.PathLike, reg: Registry, master: str | None = None, max_false_positive: float = 1e-6):
    return _trace(path, reg, master, max_false_positive)


def collude(files: list[str | os.PathLike], how: str, out: str | os.PathLike) -> dict:
    """Merge several copies (`attacks.collude`) and write the result as safetensors.

    Inputs go through the safe loader (any format `trace` reads); what they must share is their
    tensor names and shapes. Integer buffers are not carried (the loader drops them).
    """
    from . import attacks

    if len(files) < 2:
        raise BadInput("give at least two model files to merge")
    if how not in attacks.COLLUDE_HOW:
        raise BadArgument("how", f"{how!r}: choose from {', '.join(attacks.COLLUDE_HOW)}")
    states = [{k: torch.from_numpy(v) for k, v in formats.load_tensors(f).items()} for f in files]
    merged = attacks.collude(states, how)
    out = Path(out)
    if out.parent != Path(""):
        _check_writable(out.parent)
    formats.save_safetensors(merged, out)
    return {"file": str(out), "how": how, "inputs": [str(f) for f in files], "tensors": len(merged)}


def list_buyers(reg: Registry, master: str | None = None) -> list[Buyer]:
    return reg.buyers(master)


def demo(
    root: str | os.PathLike,
    buyers: int = 3,
    prune: float = 0.8,
    leaker: int = 2,
    progress: Progress | None = None,
    train_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The whole story on the example: master, buyer copies, one leaked after pruning and ONNX export, traced."""
    from . import attacks, example
    from .data import load_fashion_mnist

    root = Path(root)
    reg = open_registry(root / "registry", create=True)
    m = ensure_example(reg, progress=train_progress)
    issued = issue(reg, buyers=buyers, out=root / "buyers", master=m.name, progress=progress)
    guilty = issued[min(leaker, len(issued)) - 1]

    state = attacks.prune_global(load_file(guilty.file), prune)
    model = example.build()
    model.load_state_dict(state)
    model.eval()
    leaked = root / "leaked" / "model.onnx"
    leaked.parent.mkdir(parents=True, exist_ok=True)
    inputs, labels = load_fashion_mnist("test")
    formats.export_onnx(model, inputs[:1], leaked)
    result = trace(leaked, reg)
    reg.close()
    return {
        "master": {"name": m.name, "accuracy": m.accuracy},
        "buyers": [b.public() for b in issued],
        "leaker": {"id": guilty.id, "name": guilty.name},
        "leak": {
            "file": str(leaked),
            "pruned": prune,
            "accuracy": fidelity.evaluate(model, inputs, labels),
            "onnxruntime_agreement": fidelity.onnx_agreement(str(leaked), model, inputs),
        },
        "trace": result.to_dict(),
        "correct": result.buyer is not None and result.buyer["id"] == guilty.id,
    }


ATTACKS = (
    "prune", "prune-filters", "quantize", "noise", "permute", "permute-attention", "center", "project", "finetune",
    "transfer", "overwrite", "shift",
)


def attack(
    kind: str,
    file: str | os.PathLike,
    out: str | os.PathLike,
    strength: float = 0.0,
    *,
    mode: str | None = None,
    layers: list[str] | None = None,
    seed: int = 0,
    lr: float | None = None,
    steps: int | None = None,
    rescale: bool = True,
    heads: int | None = None,
    factory: str = EXAMPLE_FACTORY,
    data: str = EXAMPLE_DATA,
) -> dict:
    """Apply one attack of `wmtrace.attacks` to a weight file and write the result as safetensors."""
    from . import attacks

    if kind not in ATTACKS:
        raise BadInput(f"unknown attack {kind!r}: use one of {', '.join(ATTACKS)}")
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in formats.load_tensors(file).items()}
    info: dict = {"attack": kind, "input": str(file), "output": str(out), "strength": strength}

    def trainer() -> attacks.Trainer:
        return attacks.Trainer(modelio.import_object(factory), modelio.import_object(data), seed=seed)

    if kind == "prune":
        info["mode"] = mode or "global"
        result = attacks.prune(state, strength, info["mode"], seed)
    elif kind == "prune-filters":
        result = attacks.prune_filters(state, strength, layers)
    elif kind == "quantize":
        info["mode"] = mode or "int8-channel"
        result = attacks.quantize(state, info["mode"])
    elif kind == "noise":
        result = attacks.noise(state, strength, seed)
    elif kind == "permute":
        result = attacks.permute(state, strength, seed, rescale)
    elif kind == "permute-attention":
        info["heads"] = heads
        result = attacks.permute_attention(state, heads or 0, strength, seed)
    elif kind == "center":
        info["layers"] = layers
        result = attacks.center(state, layers or [])
    elif kind == "project":
        info["mode"] = mode or "mean"
        result = attacks.project(state, strength, trainer(), info["mode"])
    elif kind == "finetune":
        info["lr"] = lr if lr is not None else 0.05
        result = attacks.finetune(state, strength, trainer(), info["lr"])
    elif kind == "transfer":
        info["lr"] = lr if lr is not None else 0.01
        info["mode"] = mode or "all"
        result = attacks.transfer(state, strength, trainer(), info["lr"], info["mode"], report=info)
    elif kind == "overwrite":
        info["lr"] = lr if lr is not None else 0.01
        result = attacks.overwrite(state, strength, trainer(), lr=info["lr"], report=info)
    else:
        info["lr"] = lr if lr is not None else 0.01
        info["steps"] = steps if steps is not None else 200
        result = attacks.shift(state, strength, trainer(), info["steps"], info["lr"], seed)
    formats.save_safetensors(result, out)
    info["shapes_changed"] = sorted(k for k in state if k in result and result[k].shape != state[k].shape)
    return info
