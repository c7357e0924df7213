"""wmtrace: give every buyer of a model a copy carrying its own hidden ID, and name the buyer
behind a leaked copy.

    import wmtrace
    reg = wmtrace.open_registry("registry", create=True)
    wmtrace.init(reg, "my-model", "master.safetensors", "mypkg.models:build", data="mypkg.data:dataset")
    copies = wmtrace.issue(reg, buyers=10, out="copies/")
    result = wmtrace.trace("leaked.onnx", reg)   # a TraceResult: verdict, buyer, bound
    result = wmtrace.query(wmtrace.open_target("http://host:8080/v2/models/cnn", reveal="top1"), reg)

The CLI (`wmtrace`) is a thin layer over these; ARCHITECTURE.md says where everything else lives.
"""

from .api import (
    attack,
    backup,
    collude,
    ensure_example,
    evidence,
    export_public_key,
    export_receipt,
    init,
    issue,
    list_buyers,
    materialize,
    materialize_stream,
    migrate_registry,
    new_arbiter_key,
    open_registry,
    open_target,
    query,
    record_receipt,
    restore,
    revoke,
    sign_receipt,
    trace,
    trace_images,
    verify,
    verify_audit,
    write_probes,
)
from .errors import (
    BadArgument,
    BadInput,
    CorruptFile,
    InternalError,
    SelfCheckFailed,
    TargetFailed,
    UnknownMaster,
    WmtraceError,
)
from .pipeline.trace import TraceResult
from .registry import Buyer, Master, MasterConfig, Registry

__version__ = "0.7.0"
__all__ = [
    "BadArgument", "BadInput", "Buyer", "CorruptFile", "InternalError", "Master", "MasterConfig", "Registry",
    "SelfCheckFailed", "TargetFailed", "TraceResult", "UnknownMaster", "WmtraceError", "__version__", "attack",
    "backup", "collude", "ensure_example", "evidence", "export_public_key", "export_receipt", "init", "issue",
    "list_buyers", "materialize", "materialize_stream",
    "migrate_registry", "new_arbiter_key", "open_registry",
    "open_target", "query", "record_receipt", "restore", "revoke", "sign_receipt", "trace", "trace_images", "verify",
    "verify_audit", "write_probes",
]
