"""The black-box scheme: the codeword in a classifier's answers, read by querying it (Zhang et al. 2018,
made per buyer, error-corrected and bounded).

At `init`: K boundary queries (`queries.py`, one per codeword bit), natural queries (plain training
inputs, for surrogates), the head's placement metric and the features' principal components, all
stored with the master. At `issue`: the closed-form head edit of `edit.py`, no training. At `query`:
`plan` gives the inputs to send and `read` the soft bits of the answers (`read.py`). A weight file
is not evidence for this scheme (`locate` returns None): the white-box scheme reads weights.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ... import modelio
from ...coding import codes
from ...errors import BadArgument, BadInput
from ...registry import Master
from ...targets import Answers
from ..base import Located, MasterModel, StepProgress
from . import edit, head, queries, read

NAME = "blackbox"
PREFIX = "blackbox."
FEATURE_SAMPLES = 8192  # training inputs for the features' second moment and principal components


@dataclass(frozen=True)
class Config:
    """How a master's black-box mark is made and read."""

    head: str  # the final linear layer
    margin: float = 1.0  # logit margin the copy's answer has at each boundary query
    tilt: float = 0.02  # logit tilt per bit on ordinary inputs (carried into distilled surrogates)
    ridge: float = 0.01  # gamma: Sigma + gamma * mean eigenvalue, the placement metric's regulariser
    components: int = 64  # principal components of the features that the tilt directions mix
    natural: int = 2048  # natural queries stored for reading surrogates

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(margin: float, tilt: float) -> None:
    if not margin > 0:
        raise BadArgument("bb_margin", f"{margin}: must be > 0")
    if not tilt >= 0:
        raise BadArgument("bb_tilt", f"{tilt}: must be 0 or more")


class BlackBox:
    name = NAME
    stage = 1

    def prepare(self, master: MasterModel, bits: int, options: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Find the head, blend the boundary queries, and store what marking and reading need."""
        if master.train is None or master.probe is None:
            raise BadInput("the black-box scheme needs the master's training data (--data) to build its queries")
        cfg = Config(head.find_head(master.model, master.probe, options.get("head")),
                     **{k: options[k] for k in ("margin", "tilt") if options.get(k) is not None})
        check_options(cfg.margin, cfg.tilt)
        pool = modelio.tensors(master.train, FEATURE_SAMPLES)[0]
        if not isinstance(pool, torch.Tensor):
            raise BadInput("the black-box scheme needs tensor inputs (images, features), not dicts of tensors")
        x, pairs = queries.boundary(master.model, pool, bits, options.get("seed"))
        feats, _ = head.features(master.model, cfg.head, pool)
        hq, _ = head.features(master.model, cfg.head, x)
        sigma = feats.T @ feats / len(feats)
        gamma = cfg.ridge * float(sigma.diagonal().mean())
        directions = torch.linalg.solve(sigma + gamma * torch.eye(len(sigma), dtype=torch.float64), hq.T).T
        mean = feats.mean(0)
        p = min(cfg.components, *feats.shape)
        with torch.random.fork_rng():  # randomised SVD: the top components in 1 s, not 40 for all of them
            torch.manual_seed(0)
            _, sv, v = torch.svd_lowrank(feats - mean, q=min(p + 16, *feats.shape), niter=4)
        pcs = v[:, :p].T * (len(feats) ** 0.5 / sv[:p, None].clamp_min(1e-12))  # <pc_j, h - mu>: unit variance
        rng = np.random.default_rng(secrets.randbits(128) if options.get("seed") is None else options["seed"] + 1)
        natural = pool[torch.from_numpy(rng.permutation(len(pool))[: cfg.natural])]
        stored = {"queries": x, "pairs": torch.from_numpy(pairs), "directions": directions.float(),
                  "components": pcs.float(), "mean": mean.float(), "natural": natural.float().contiguous()}
        return cfg.to_dict(), {PREFIX + k: v.contiguous() for k, v in stored.items()}

    def issuer(self, master: MasterModel, m: Master, config: dict, key: bytes,
               stored: dict[str, np.ndarray]) -> Marker:
        return Marker(Config.from_dict(config), basis(config, key, stored), _stored(stored, "queries").float())

    def locate(self, evidence: Mapping[str, np.ndarray], m: Master, config: dict) -> Located | None:
        return None  # weights are the white-box scheme's evidence; this one reads answers (`plan`, `read`)

    def extract(self, located: Located, m: Master, config: dict, key: bytes, bits: int,
                stored: dict[str, np.ndarray]) -> np.ndarray:
        return np.full(bits, np.nan)

    def revealed(self, m: Master, config: dict) -> list[str]:
        return []  # reads a model's answers, not the weights of a file

    def plan(self, model: nn.Module, config: dict, key: bytes, stored: dict[str, np.ndarray],
             natural: bool = True) -> Plan:
        """The queries to send, in order (boundary queries, then natural ones unless `natural` is
        False: only full scores read them), and the master's answers and linear map at each, for `read`."""
        cfg = Config.from_dict(config)
        b = basis(config, key, stored)
        parts = [_stored(stored, "queries")] + ([_stored(stored, "natural")] if natural else [])
        inputs = torch.cat(parts).float()
        feats, logits = head.features(model, cfg.head, inputs)
        k = b.bits
        id_bits = min(8 * codes.ID_BYTES, k)
        order = np.r_[np.arange(id_bits, k), np.arange(id_bits)]  # ID bits last: they are not scored
        a, _ = b.solve(feats[:k], logits[:k])
        lin = b.linear(feats, a)
        lin = lin - lin.mean(1, keepdim=True)
        perm = torch.from_numpy(np.r_[order, np.arange(k, len(inputs))])
        ref = read.Reference(b, order, torch.log_softmax(logits, 1)[perm], lin[perm], k)
        return Plan(inputs[perm].numpy(), ref)


@dataclass
class Plan:
    """What a query session sends (`inputs`, in order) and how answers become soft bits."""

    inputs: np.ndarray
    reference: read.Reference

    def read(self, answers: Answers, reveal: str) -> np.ndarray:
        return read.soft_bits(self.reference, answers, reveal)


def _stored(stored: dict[str, np.ndarray], name: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.asarray(stored[PREFIX + name]))
    except KeyError:
        raise BadInput(f"the master's stored black-box {name!r} is missing: register it again") from None


def basis(config: dict, key: bytes, stored: dict[str, np.ndarray]) -> edit.Basis:
    cfg = Config.from_dict(config)
    pairs = _stored(stored, "pairs").long()
    directions = _stored(stored, "directions").double()
    classes = int(pairs.max()) + 1
    mask, tilt_dirs, tilt_classes = edit.keyed(key, len(pairs), max(classes, 2), _stored(stored, "components"))
    return edit.Basis(pairs, directions, tilt_dirs, tilt_classes, _stored(stored, "mean").double(), mask,
                      cfg.margin, cfg.tilt, max(classes, 2))


class Marker:
    """Marks copies: the edit of the head, solved on the copy's own features (after any other scheme's mark)."""

    def __init__(self, cfg: Config, b: edit.Basis, inputs: torch.Tensor):
        self.cfg, self.basis, self.inputs = cfg, b, inputs

    def embed(self, model: nn.Module, bits: np.ndarray, seed: int, progress: StepProgress | None,
              scale: float = 1.0) -> None:
        """The closed-form head edit; `scale` is ignored: the boundary queries' margin is what makes a
        label answer readable at all, so it is never weakened."""
        layer = dict(model.named_modules())[self.cfg.head]
        feats, logits = head.features(model, self.cfg.head, self.inputs)
        dw, db = self.basis.edit(self.basis.signed(bits), feats, logits)
        with torch.no_grad():
            layer.weight += dw.to(layer.weight.dtype)
            if layer.bias is not None:
                layer.bias += db.to(layer.bias.dtype)
        model.eval()

    def margin(self, model: nn.Module, bits: np.ndarray) -> float:
        """The smallest boundary query margin in the bit's direction, over `margin` (1.0: as placed)."""
        _, logits = head.features(model, self.cfg.head, self.inputs)
        rows = torch.arange(self.basis.bits)
        pairs = self.basis.pairs
        got = (logits[rows, pairs[:, 1]] - logits[rows, pairs[:, 0]]) * self.basis.signed(bits)
        return float(got.min()) / self.cfg.margin
