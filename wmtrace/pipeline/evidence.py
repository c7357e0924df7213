"""Evidence a third party can check, seller side: statements and receipts after `issue`, and the
bundle `wmtrace evidence LEAK` writes (verified by `pipeline.verify` with no registry).

A bundle holds what an arbiter needs and nothing more: the leak's hash, the trace result, the signed
statements and Merkle proofs of the accused buyers (their receipts and acknowledgements), the audit
chain from the master's key commitment to this trace, and what re-running the extraction needs: that
master's key and its carrier tensors only (never another master's, never the full weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch

from .. import formats, modelio, schemes
from ..errors import BadInput
from ..evidence import seal, timestamp
from ..evidence.signing import canonical, document_hash
from ..registry import Buyer, Registry
from .trace import COLLUDERS, DEFAULT_MAX_FALSE_POSITIVE, IDENTIFIED, TraceResult, trace_tensors

BUNDLE = "bundle.json"
REVEAL, SEALED = "reveal.json", "reveal.sealed"  # the master's key and nonces, in the clear or for the arbiter
FORMAT = "wmtrace/evidence"


def write_document(path: Path, doc: dict) -> None:
    """A signed document as its canonical bytes (what its signature and any timestamp cover), atomically."""
    formats.stream.write_atomic(path, [canonical(doc) + b"\n"], digest=False)


def publish(reg: Registry, master: str, issued: Sequence[Buyer], out: Path) -> dict | None:
    """After `issue`: a signed statement over the master's buyers not yet in one (these, and any an
    interrupted run left), its RFC 3161 request, and each buyer's receipt beside their copy."""
    if not issued:
        return None
    doc = reg.make_statement(master)
    if doc is not None:
        name = f"statement-{doc['number']}"
        write_document(out / f"{name}.json", doc)
        (out / f"{name}.tsq").write_bytes(timestamp.request(canonical(doc) + b"\n"))
    receipts = reg.receipts(master, [b.id for b in issued])  # one call: each statement's tree built once
    for b in issued:
        r = receipts.get(b.id)
        if r is not None:
            path = out / f"{b.name}.receipt.json"
            write_document(path, r)
            b.extra["receipt"] = str(path)
    return doc


def leak_sha256(path: str | os.PathLike) -> tuple[str, int]:
    """(sha256, bytes) of a leaked file; of a folder, sha256 over each file's relative path and sha256."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise BadInput(f"{path}: no file to hash")
    digests, size = [], 0
    for f in files:
        size += f.stat().st_size
        digests.append((f.relative_to(path).as_posix() if f != path else "", modelio.sha256_file(f)))
    if path.is_file():
        return digests[0][1], size
    return hashlib.sha256(canonical(digests)).hexdigest(), size


class NothingToProve(BadInput):
    """The leak names nobody: there is no accusation to bundle (exit code 1, as a trace naming nobody)."""

    exit_code = 1


def build(reg: Registry, leak: str | os.PathLike, out: str | os.PathLike, master: str | None = None,
          max_false_positive: float = DEFAULT_MAX_FALSE_POSITIVE, seal_to: bytes | None = None) -> dict:
    """Trace `leak` and write its evidence bundle to the new folder `out`; returns the signed manifest.

    The trace is logged with the leak's sha256 (the chain entry the bundle points at), then a "reveal"
    entry records that this master's key left the registry: rotate to a new master (`wmtrace init`) for
    copies sold from now on if the arbiter may not be trusted with it (README, *Threat model*). `seal_to`: an
    arbiter's X25519 public key: what reveals the key (`reveal.sealed`) is readable by that arbiter alone."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInput(f"{out}: exists and is not an empty folder; evidence goes into a new one")
    sha, size = leak_sha256(leak)
    result = trace_tensors(formats.open_tensors(leak), reg, str(leak), master, max_false_positive)
    accused = [result.buyer["id"]] if result.buyer else [c["id"] for c in result.colluders]
    entry = reg.log_trace(str(leak), result.verdict, result.master, result.buyer["id"] if result.buyer else None,
                          [c["id"] for c in result.colluders], sha256=sha)
    if result.verdict not in (IDENTIFIED, COLLUDERS):
        raise NothingToProve(f"{leak}: {result.verdict}, nobody is named: there is no accusation to bundle")
    m = reg.master(result.master)
    receipts = reg.receipts(m.name, accused)
    if len(receipts) < len(accused):  # issued by a run that stopped before its statement
        reg.make_statement(m.name)
        receipts = reg.receipts(m.name, accused)
    commitment = reg.commitment(m.name)
    chain = reg.audit_chain()
    start = next(e["seq"] for e in chain if e["hash"] == commitment["committed_in"])
    end = next(e["seq"] for e in chain if e["hash"] == entry["hash"])
    with formats.write.atomic_folder(out) as tmp:
        _write_reveal(reg, m, accused, tmp, seal_to)
        for i, r in receipts.items():
            (tmp / "receipts").mkdir(exist_ok=True)
            write_document(tmp / "receipts" / f"{i}.json", r)
            if (ack := reg.ack(m.name, i)) is not None:
                write_document(tmp / "receipts" / f"{i}.ack.json", ack)
        (tmp / "audit.json").write_text(json.dumps([e for e in chain if start <= e["seq"] <= end], indent=1))
        (tmp / "seller.pub").write_text(reg.public_key().pem())
        files = {p.relative_to(tmp).as_posix(): modelio.sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = reg.seller_key().sign_document({
            "type": FORMAT, "version": 1, "seller": reg.public_key().fingerprint, "created": time.time(),
            "leak": {"name": Path(leak).name, "sha256": sha, "bytes": size}, "master": m.name,
            "verdict": result.verdict, "accused": accused, "trace_entry": entry["hash"],
            "max_false_positive": max_false_positive, "result": _public(result), "files": files,
            "sealed_to": seal_to.hex() if seal_to else None})
        write_document(tmp / BUNDLE, manifest)
        (tmp / "bundle.tsq").write_bytes(timestamp.request(canonical(manifest) + b"\n"))
    reg.log_event("reveal", m.name, leak_sha256=sha, bundle=document_hash(manifest), accused=accused)
    return manifest


def _write_reveal(reg: Registry, m, accused: list[int], folder: Path, seal_to: bytes | None) -> None:
    """What re-running the extraction needs: the master's key (with its commitment's nonce), its
    configuration, the issued IDs (the bound counts them), its carriers and their stored metric."""
    names = sorted({n for s, cfg in m.config.schemes.items() for n in schemes.get(s).revealed(m, cfg)})
    with safe_open(str(m.weights), framework="pt") as f:
        save_torch({n: f.get_tensor(n).contiguous() for n in names}, str(folder / "carriers.safetensors"))
    stored = {k: np.ascontiguousarray(v) for k, v in reg.stored(m).items() if k in names}
    if stored:
        save_numpy(stored, str(folder / "stored.safetensors"))
    reveal = {"master": m.name, "key": reg.key(m.name).hex(), "key_nonce": reg.commitment(m.name)["commit_nonce"],
              "config": m.config.to_json(), "weights_sha256": m.weights_sha256,
              "issued_ids": [int(i) for i in reg.issued_ids(m.name)],
              "codeword_nonces": {str(i): reg.codeword_nonce(m.name, i).hex() for i in accused}}
    data = json.dumps(reveal, sort_keys=True).encode()
    path = folder / (REVEAL if seal_to is None else SEALED)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the key: 0600 like every key file
    with os.fdopen(fd, "wb") as fh:
        fh.write(data if seal_to is None else seal.seal(seal_to, data))


def _public(result: TraceResult) -> dict:
    """The trace result as the bundle states it (the leak's path on the seller's machine left out)."""
    d = result.to_dict()
    d.pop("file", None)
    return d

