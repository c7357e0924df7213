"""The Python API: what the CLI does, callable from distribution scripts.

    from wmtrace import api
    reg = api.open_registry("registry", create=True)
    api.init(reg, "my-model", "master.safetensors", "mypkg.models:build", data="mypkg.data:dataset")
    buyers = api.issue(reg, buyers=10, out="copies/")
    result = api.trace("leaked.onnx", reg)
    result = api.query(api.open_target("http://host:8080/v2/models/cnn", reveal="top1"), reg)

A facade: the work is done in `wmtrace.pipeline` (register, issue, trace) over the schemes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file

from . import fidelity, formats, modelio
from .errors import BadArgument, BadInput
from .pipeline import evidence as evidence_mod
from .pipeline import images, patches, receipts
from .pipeline import verify as verify_mod
from .pipeline.issue import Progress, check_buyer_name, check_issue, issue
from .pipeline.patches import check_store
from .pipeline.query import query
from .pipeline.register import EXAMPLE_DATA, EXAMPLE_FACTORY, EXAMPLE_MASTER, ensure_example, init
from .pipeline.trace import DEFAULT_MAX_FALSE_POSITIVE, TraceResult, trace
from .registry import Buyer, Registry, RegistryBackend, default_path, is_postgres
from .registry import backup as registry_backup
from .registry import migrate as registry_migrate
from .registry import open as open_backend
from .schemes.whitebox.embed import EmbedConfig
from .targets import open_target

# The default mark strength, as `init` takes it (the white-box scheme's; see `embed.EmbedConfig`).
DEFAULT_STRENGTH = EmbedConfig.strength
# Kept for scripts written against earlier releases; `wmtrace.modelio` is their home.
import_object, sha256_file, build_model = modelio.import_object, modelio.sha256_file, modelio.build_model

__all__ = [
    "DEFAULT_MAX_FALSE_POSITIVE", "DEFAULT_STRENGTH", "EXAMPLE_DATA", "EXAMPLE_FACTORY", "EXAMPLE_MASTER", "Buyer",
    "Progress", "Registry", "TraceResult", "attack", "backup", "check_buyer_name", "check_issue", "check_store",
    "collude", "demo", "ensure_example", "evidence", "export_public_key", "export_receipt", "init", "issue",
    "new_arbiter_key",
    "list_buyers", "materialize", "materialize_stream",
    "migrate_registry", "open_registry", "open_target", "query", "record_receipt", "restore", "revoke",
    "sign_receipt", "trace", "trace_images", "verify_audit", "write_probes",
    "verify",
]


def open_registry(path: str | os.PathLike | None = None, create: bool = False,
                  storage: str | None = None) -> RegistryBackend:
    """The registry at `path` ($WMTRACE_REGISTRY or ./registry by default): a folder, or a
    `postgresql://` URL shared by many hosts (`storage`: where a new database keeps master files,
    default $WMTRACE_STORAGE). `create=True` makes it (a folder: on the first write)."""
    return open_backend(path, create=create, storage=storage)


def migrate_registry(src: RegistryBackend, to: str | os.PathLike, storage: str | None = None) -> dict:
    """Copy the registry `src` into the empty registry at `to` (a folder or a PostgreSQL URL), verified:
    counts, every master's weights sha256 and key fingerprint, every buyer's sha256 and codeword."""
    with open_backend(to, create=True, storage=storage) as dst:
        return registry_migrate.migrate(src, dst)


def evidence(reg: RegistryBackend, leak: str | os.PathLike, out: str | os.PathLike, master: str | None = None,
             max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE, seal_to: str | os.PathLike | None = None) -> dict:
    """Trace `leak` and write the evidence bundle an arbiter checks with `verify` (no registry needed);
    returns its signed manifest. Reveals that master's key to whoever holds the bundle, or, with `seal_to`
    (an arbiter's public key file from `new_arbiter_key`), to that arbiter alone."""
    recipient = receipts.read_arbiter_public(seal_to) if seal_to is not None else None
    return evidence_mod.build(reg, leak, out, master, max_false_positive, recipient)


def verify(bundle: str | os.PathLike, leak: str | os.PathLike, public_key: str | os.PathLike,
           arbiter_key: str | os.PathLike | None = None) -> verify_mod.Verification:
    """Check an evidence bundle against the leak and the seller's public key file (PEM or 64 hex digits);
    `arbiter_key`: the arbiter's private key file, for a bundle sealed to them."""
    private = receipts.read_arbiter_private(arbiter_key) if arbiter_key is not None else None
    return verify_mod.verify(bundle, leak, receipts.read_public_key(public_key), private)


def verify_audit(reg: RegistryBackend, statements: list[str | os.PathLike] = ()) -> dict:
    """The registry's signed log checked entry by entry, and against statements published from it (files):
    their pinned heads show a log cut at its end, which the chain alone cannot."""
    return reg.verify_chain([receipts.read_document(p, "wmtrace statement") for p in statements])


def new_arbiter_key(path: str | os.PathLike) -> str:
    """Create an arbiter's X25519 key file (0600) and `PATH.pub` beside it; returns the public key (hex)."""
    return receipts.new_arbiter_key(path)


def export_public_key(reg: RegistryBackend) -> str:
    """The registry's seller public key as PEM (created with the registry's first signed entry)."""
    return reg.public_key().pem()


def export_receipt(reg: RegistryBackend, buyer: str | int, out: str | os.PathLike, master: str | None = None) -> dict:
    return receipts.export(reg, buyer, out, master)


def sign_receipt(receipt: str | os.PathLike, key: str | os.PathLike, out: str | os.PathLike | None = None,
                 copy: str | os.PathLike | None = None, seller_key: str | os.PathLike | None = None) -> dict:
    """The buyer's side: check a receipt (and the copy) and sign it with the buyer's key file."""
    return receipts.sign(receipt, key, out, copy, seller_key)


def revoke(reg: RegistryBackend, buyer: str | int, reason: str, master: str | None = None) -> dict:
    """End a buyer's licence, in a signed audit entry; `trace` still names them for the copy they hold."""
    return receipts.revoke(reg, buyer, reason, master)


def record_receipt(reg: RegistryBackend, ack: str | os.PathLike) -> dict:
    """Keep a buyer's signed acknowledgement, checked against their receipt."""
    return receipts.record(reg, ack)


def collude(files: list[str | os.PathLike], how: str, out: str | os.PathLike) -> dict:
    """Merge several copies (`attacks.collude`) and write the result as safetensors.

    Inputs go through the safe loader (any format `trace` reads); what they must share is their
    tensor names and shapes. Integer buffers are not carried (the loader drops them). Returns
    `file`, `how`, `inputs` and `tensors`, with the rest of what `attacks.apply` reports.
    """
    from . import attacks

    return attacks.apply("collude", list(files), out, how=how)


def write_probes(reg: RegistryBackend, master: str, out: str | os.PathLike) -> list[Path]:
    """The master's probe inputs as `probe-NN.png` files in `out`: what a suspect image-to-image model is
    run on, its outputs then read by `trace_images`."""
    return images.write_probes(reg, master, out)


def trace_images(reg: RegistryBackend, outputs: list[str | os.PathLike] | None = None, master: str | None = None,
                 model: str | os.PathLike | None = None,
                 max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE) -> TraceResult:
    """Name the buyer behind output images of the master's probes (files or folders, matched to probes by
    their `probe-NN` names), or behind a model file run on the probes here (`model`: weights the master's
    factory builds, or ONNX). Same verdicts, bounds and exit codes as `trace`."""
    if (outputs is None) == (model is None):
        raise BadArgument("outputs", "give output images or a model file, not both")
    if model is not None:
        names = [m.name for m in images.masters(reg, master)]
        if len(names) != 1:
            raise BadArgument("master", "name the master whose probes the model is run on (--master)")
        found = images.run_model(images.file_model(model, reg, names[0]), reg, names[0])
        return images.trace_images(found, reg, names[0], max_false_positive, name=str(model))
    return images.trace_images(list(outputs), reg, master, max_false_positive)


def list_buyers(reg: Registry, master: str | None = None) -> list[Buyer]:
    return reg.buyers(master)


def materialize(reg: Registry, buyer: str | int, out: str | os.PathLike, master: str | None = None) -> dict:
    """Rebuild the full copy of a buyer issued with `store="patch"` into `out` (a file; a folder for a
    sharded master) from the master's file and the buyer's patch, byte for byte the copy a full issue
    writes; written atomically and checked against the registered sha256 first (`pipeline.patches`).
    Returns `buyer`, `file`, `sha256`, `bytes` (the copy's) and `patch_bytes`."""
    return patches.materialize(reg, buyer, out, master)


def materialize_stream(reg: Registry, buyer: str | int, master: str | None = None):
    """(size, iterator of bytes) of a patched buyer's full copy, for a download server. The sha256 is
    checked as it streams and the iterator raises at its end on a mismatch: do not complete the
    response (send the last chunk) until the iterator has finished without raising."""
    return patches.materialize_stream(reg, buyer, master)


def backup(reg: Registry, dest: str | os.PathLike) -> dict:
    """Copy the registry (database, keys, masters) into the new folder `dest`, verified; see
    `wmtrace.registry.backup`. The keys are the one thing that must never be lost."""
    if not isinstance(reg, Registry):
        raise BadInput(f"{reg.location}: back up a PostgreSQL registry with pg_dump plus its storage, or copy it "
                       "to a folder with 'wmtrace registry migrate --to FOLDER'")
    return registry_backup.backup(reg, dest)


def restore(src: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    """Install a backup as the registry at `root` (default: $WMTRACE_REGISTRY or ./registry), which
    must hold no registry: a key is never overwritten."""
    if root is not None and is_postgres(str(root)):
        raise BadInput("restore into a folder, then copy it to PostgreSQL with 'wmtrace registry migrate --to URL'")
    return registry_backup.restore(src, root if root is not None else default_path())


def demo(
    root: str | os.PathLike,
    buyers: int = 3,
    prune: float = 0.8,
    leaker: int = 2,
    progress: Progress | None = None,
    train_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """The whole story on the example: master, buyer copies, one leaked after pruning and ONNX export, traced;
    another served behind an HTTP endpoint answering top-1 labels, named from its answers."""
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
    served = _serve_and_query(reg, issued[0] if guilty is not issued[0] else issued[-1], root / "served", inputs[:1])
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
        "served": served,
        "correct": result.buyer is not None and result.buyer["id"] == guilty.id and served["correct"],
    }


def _serve_and_query(reg: Registry, b: Buyer, folder: Path, example_input) -> dict:
    """The black-box half of the demo: `b`'s copy, exported to ONNX, served on 127.0.0.1 answering top-1
    labels only, and named from those answers (`query`)."""
    from . import example
    from .targets import OnnxTarget
    from .targets.serve import Server

    model = example.build()
    model.load_state_dict(load_file(b.file), strict=False)
    folder.mkdir(parents=True, exist_ok=True)
    formats.export_onnx(model.eval(), example_input, folder / "model.onnx")
    runner = OnnxTarget(folder / "model.onnx", reveal="scores", k=5, decimals=None, batch=256, input_name=None,
                        output_name=None)
    with Server(runner.outputs, "fashion-cnn", tuple(example_input.shape[1:]), reveal="top1") as server:
        with open_target(server.url, reveal="top1") as target:
            result = query(target, reg)
    return {"buyer": {"id": b.id, "name": b.name}, "url": server.url, "reveal": "top1",
            "query": result.to_dict(), "correct": result.buyer is not None and result.buyer["id"] == b.id}


def __getattr__(name: str):
    """`api.ATTACKS`, every attack's name: read from `wmtrace.attacks`, whose families declare them."""
    if name == "ATTACKS":
        from .attacks import ATTACKS

        return tuple(ATTACKS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def attack(
    kind: str, file: str | os.PathLike, out: str | os.PathLike, strength: float | None = None,
    *, factory: str = EXAMPLE_FACTORY, data: str = EXAMPLE_DATA, **params,
) -> dict:
    """Apply the attack `kind` of `wmtrace.attacks` to a weight file and write the result as safetensors.

    `params` are the attack's declared parameters (`mode`, `layers`, `seed`, `lr`, `steps`, `rescale`,
    `heads`, `temperature`, ...; `wmtrace attack KIND --help` lists them with their defaults); a
    missing or None one takes the declared default, an undeclared one is refused. `factory` and
    `data` name the model code and the attacker's data for attacks that need them. Returns what was
    done (`attacks.apply`)."""
    from . import attacks

    if strength is not None:
        params["strength"] = strength
    return attacks.apply(kind, file, out, factory=factory, data=data, **params)
