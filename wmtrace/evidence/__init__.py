"""Evidence a third party can check: the seller's signing key, commitments, Merkle statements over buyers,
receipts, the hash chain of the audit log, and RFC 3161 timestamp requests.

This layer is plain cryptography over JSON documents (Ed25519 from `cryptography`, SHA-256): it imports no
scheme, registry, format, API or CLI, so `wmtrace verify` rests on it and on the extraction alone. Every
signed document is canonical JSON (`signing.canonical`): sorted keys, no spaces, UTF-8, so any JSON library
reproduces the bytes a signature covers.
"""

from . import chain, commit, merkle, signing, statement, timestamp

__all__ = ["chain", "commit", "merkle", "signing", "statement", "timestamp"]
