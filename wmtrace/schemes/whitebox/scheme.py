"""The white-box scheme: the codeword in keyed statistics of a few carrier layers' weights.

Uchida et al.'s embedding, improved: carriers are chosen by what a mark there costs on real inputs,
each bit reads its own keyed signed mean of the filters, the mark is placed in closed form (no
training per buyer), and a leak is read by aligning its carriers to the master and fitting the placed
change by least squares (`extract`). Registered configuration: `Config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from ... import batches, modelio
from ...errors import BadArgument, BadInput, first_line
from ...registry import Master
from ..base import Located, MasterModel, StepProgress
from . import calibrate, embed
from . import carriers as carriers_mod
from . import extract as extract_mod
from .align import locate
from .carriers import Carrier

NAME = "whitebox"
CALIBRATION_SAMPLES = 2000  # held-out inputs on which `init --fidelity` measures each trial strength
PLACEMENTS = ("activation", "minimal-norm")


@dataclass(frozen=True)
class Config:
    """The carriers (with each one's margin, the statistic's target size) and how marks are placed."""

    carriers: tuple[Carrier, ...]
    margins: tuple[float, ...]
    embed: embed.EmbedConfig
    calibration: calibrate.Calibration | None = None  # how the strength was chosen (`init --fidelity`)

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        cfg = embed.EmbedConfig(**d["embed"])
        if cfg.placement not in PLACEMENTS:
            raise BadInput(f"unknown placement {cfg.placement!r} ({', '.join(PLACEMENTS)})")
        found = d.get("calibration")
        return cls(tuple(Carrier.from_dict(c) for c in d["carriers"]), tuple(float(c["margin"]) for c in d["carriers"]),
                   cfg, calibrate.Calibration.from_dict(found) if found else None)

    def to_dict(self) -> dict:
        d = {"carriers": [{**c.to_dict(), "margin": m} for c, m in zip(self.carriers, self.margins, strict=True)],
             "embed": asdict(self.embed)}
        return d | ({"calibration": self.calibration.to_dict()} if self.calibration else {})

    @classmethod
    def of(cls, m: Master) -> Config:
        """The white-box configuration a master was registered with."""
        if NAME not in m.config.schemes:
            raise BadInput(f"master {m.name!r} carries no white-box mark")
        return cls.from_dict(m.config.schemes[NAME])


def check_options(strength: float, steps: int, placement: str, output: str, loss: str | None,
                  layers: int | None) -> None:
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


def _inputs(ds, limit: int):
    """The first `limit` training inputs, streamed in bounded batches (labels dropped)."""
    return (x for x, _ in modelio.stream(ds, limit))


def _calibrate(master: MasterModel, chosen: list[Carrier], metrics: list, cfg: embed.EmbedConfig,
               options: dict) -> calibrate.Calibration | None:
    """The strength search of `init --fidelity` (None without a target or held-out data): trial copies
    on up to `CALIBRATION_SAMPLES` held-out inputs, the configured strength as the ceiling."""
    target = options.get("fidelity")
    if not target or master.held_out is None:
        return None
    samples = min(len(master.held_out), options.get("eval_samples") or CALIBRATION_SAMPLES, CALIBRATION_SAMPLES)
    return calibrate.search(master.model, chosen, metrics, lambda: modelio.stream(master.held_out, samples), target,
                            cfg.strength, cfg.output, options.get("progress"))


class WhiteBox:
    name = NAME
    stage = 0

    def prepare(self, master: MasterModel, bits: int, options: dict) -> tuple[dict, dict[str, torch.Tensor]]:
        """Choose the carriers (where a mark costs least on `master.probe`) and fix the placement metric.

        The metric is stored with the master: issuing places marks with it, and tracing needs it to
        recover a mark from the dimensions a structurally pruned copy has left."""
        cfg = embed.EmbedConfig(strength=options["strength"], steps=options["steps"],
                                placement=options["placement"], output=options["output"], loss=options["loss"])
        model, probe = master.model, master.probe
        sample = batches.take(probe, slice(0, 8)) if probe is not None else None
        try:
            used = carriers_mod.used_weights(model, sample) if sample is not None else list(model.state_dict())
        except (TypeError, RuntimeError, ValueError) as e:
            raise BadInput(f"the model does not run on the data given ({first_line(e)})") from e
        moment_inputs = None
        if master.train is not None and cfg.placement == "activation":
            moment_inputs = master.train
        found: dict[str, np.ndarray | None] = {}

        def metrics(cands: list[Carrier]) -> list[np.ndarray | None]:
            todo = [c for c in cands if c.name not in found]
            if todo and moment_inputs is not None:
                computed = embed.input_moments(model, todo, _inputs(moment_inputs, cfg.moment_samples), cfg.ridge)
                found.update(zip([c.name for c in todo], computed, strict=True))
            return [found.get(c.name) for c in cands]

        def cost(cands: list[Carrier]) -> list[float]:
            return embed.distortion(model, cands, metrics(cands), cfg.strength, probe, cfg)

        chosen = carriers_mod.select(master.state, bits, options["carriers"], count=options["layers"], allowed=used,
                                     cost=cost if probe is not None else None)
        calibration = _calibrate(master, chosen, metrics(chosen), cfg, options)
        if calibration is not None:
            cfg = replace(cfg, strength=calibration.strength)
        margins = tuple(embed.margin(master.state[c.name], c, cfg.strength) for c in chosen)
        stored = {c.name: torch.from_numpy(mt) for c, mt in zip(chosen, metrics(chosen), strict=True)
                  if mt is not None}
        return Config(tuple(chosen), margins, cfg, calibration).to_dict(), stored

    def issuer(self, master: MasterModel, m: Master, config: dict, key: bytes,
               stored: dict[str, np.ndarray]) -> Marker:
        return Marker(master, m, Config.from_dict(config), key, stored)

    def locate(self, evidence: Mapping[str, np.ndarray], m: Master, config: dict) -> Located | None:
        cfg = Config.from_dict(config)
        arrays = extract_mod.master_arrays(m, [c.name for c in cfg.carriers])
        found = locate(evidence, arrays, list(cfg.carriers))
        if all(f is None for f in found):
            return None
        report = [{"carrier": f.carrier.name, "found_as": f.source, "similarity": round(f.similarity, 4),
                   "found_by": "name" if f.by_name else "match"} for f in found if f is not None]
        score = sum(f.similarity for f in found if f is not None) / len(found)
        return Located(score, (found, arrays), report)

    def revealed(self, m: Master, config: dict) -> list[str]:
        return [c.name for c in Config.from_dict(config).carriers]

    def extract(self, located: Located, m: Master, config: dict, key: bytes, bits: int,
                stored: dict[str, np.ndarray]) -> np.ndarray:
        found, arrays = located.found
        return extract_mod.extract(found, arrays, key, Config.from_dict(config), bits, stored)


class Marker:
    """Marks copies of one master: the keyed secrets and placement maps are computed once per run."""

    def __init__(self, master: MasterModel, m: Master, cfg: Config, key: bytes, stored: dict[str, np.ndarray]):
        self.master, self.cfg = master, cfg
        self.carriers, self.margins = list(cfg.carriers), list(cfg.margins)
        self.secrets = [c.secret(key) for c in self.carriers]
        if master.train is None and (cfg.embed.steps > 0 or (cfg.embed.placement == "activation" and not stored)):
            raise BadInput(f"master {m.name!r} has no data entry point to fine-tune on")
        metrics: list[np.ndarray | None] = [None] * len(self.carriers)  # what the carriers see on real inputs
        if cfg.embed.placement == "activation":
            metrics = [stored.get(c.name) for c in self.carriers]
            if not stored:  # registered before the metric was stored with the master
                inputs = _inputs(master.train, cfg.embed.moment_samples)
                metrics = embed.input_moments(master.model, self.carriers, inputs, cfg.embed.ridge)
        self.maps = [carriers_mod.embedding_map(s, mt) for s, mt in zip(self.secrets, metrics, strict=True)]

    def embed(self, model: nn.Module, bits: np.ndarray, seed: int, progress: StepProgress | None,
              scale: float = 1.0) -> None:
        """Place `bits` at the registered margins times `scale`: a weaker copy still reads as its buyer,
        with soft bits of about `scale` instead of 1 (and so less room against attacks)."""
        state = {k: v.clone() for k, v in model.state_dict().items()}
        margins = [m * scale for m in self.margins]
        embed.place(state, self.carriers, self.secrets, margins, bits, maps=self.maps)
        model.load_state_dict(state, strict=False)
        steps = self.cfg.embed.steps
        if steps > 0:
            step_cb = (lambda s, h: progress(s, steps, h)) if progress else None
            data = modelio.shuffled_batches(self.master.train, self.cfg.embed.batch_size, seed=seed)
            embed.repair(model, self.master.model, data, self.carriers, self.secrets, margins, bits,
                         self.cfg.embed, step_cb)
        model.eval()

    def margin(self, model: nn.Module, bits: np.ndarray) -> float:
        return embed.min_margin(model, self.master.model, self.carriers, self.secrets, self.margins, bits)
