"""Marks in output images (the `images` scheme) on the shipped U-Net denoiser: faithfulness, one image,
edits of the images, surrogates, fine-tuning, collusion, and images that must name nobody.

    python benchmarks/bench_images.py --part local --out benchmarks/results/images_local.json
    python benchmarks/bench_images.py --part surrogates --device cuda --out benchmarks/results/images_surrogates.json

The master is registered with both marks (white-box at strength 0.02 with no fidelity search, images at
its default 45 dB) on the example's own data, and `--buyers` copies are issued. Bounds are reported for a
registry of `--crowd` buyers (1,000): the score of the buyer's codeword is measured, and the union bound
over that many innocents (`accuse.bound`) and its threshold (`accuse.threshold`) are the ones `trace` would
apply with that many buyers issued.

`local`: per copy, outputs' PSNR to the master's and the task PSNR against clean targets (test split); the
score from each single probe output; every image edit of `attacks.IMAGE_ATTACKS` at the listed strengths,
read from 1, 4, 8 and 16 images; averaged outputs of two copies; weights averaged (`attacks.collude`);
fine-tuning on clean pairs (`finetune_images`); the master's outputs, clean photographs and a model that is
not ours. `surrogates`: for each architecture and loss, a surrogate trained on `--pairs` answers of each copy
(`surrogate_images`, `--steps` steps), read from 1 and 16 probe outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wmtrace import api, denoise  # noqa: E402
from wmtrace.attacks import edit_images  # noqa: E402
from wmtrace.attacks.finetune_images import finetune_images  # noqa: E402
from wmtrace.attacks.surrogate_images import surrogate_images  # noqa: E402
from wmtrace.coding import accuse, codes  # noqa: E402
from wmtrace.formats import images as image_files  # noqa: E402
from wmtrace.pipeline import images  # noqa: E402
from wmtrace.schemes.images.read import Reader  # noqa: E402

EDITS = [("jpeg", {"quality": 50}), ("jpeg", {"quality": 75}), ("jpeg", {"quality": 90}),
         ("resize", {"scale": 0.5}), ("resize", {"scale": 0.75}), ("crop", {"fraction": 0.5}),
         ("crop", {"fraction": 0.25}), ("noise", {"sigma": 5}), ("blur", {"radius": 1.0}),
         ("blur", {"radius": 0.5}), ("jitter", {"strength": 0.1})]
COUNTS = (1, 4, 8, 16)


class Scorer:
    """The score of a buyer's codeword in soft bits read from (probe, image) pairs, and the verdict a
    registry of `crowd` buyers would give it (bound and threshold over that many)."""

    def __init__(self, reg, crowd: int, max_fp: float = 1e-6):
        m = reg.master("den")
        self.key, self.spec, self.crowd, self.max_fp = reg.key("den"), m.config.code, crowd, max_fp
        model, _ = api.modelio.build(m)
        self.model = model
        self.reader = Reader.of(model, m.config.schemes["images"], self.key, reg.stored(m))
        self.threshold = accuse.threshold(crowd, max_fp)

    def words(self, ids: list[int]) -> np.ndarray:
        return np.stack([np.packbits(codes.codeword(self.key, "den", i, self.spec)) for i in ids])

    def score(self, outputs, ids: list[int]) -> list[float]:
        soft, _ = self.reader.soft_bits(outputs)
        return [round(float(z), 3) for z in accuse.scores(soft, self.words(ids), self.spec)]

    def named(self, z: float) -> bool:
        return z >= self.threshold


def register(root: Path, buyers: int, mirror: bool = True):
    reg = api.open_registry(root / "registry", create=True)
    t = time.time()
    api.init(reg, "den", denoise.weights(), "wmtrace.denoise:build", data="wmtrace.denoise:dataset",
             scheme_names=["whitebox", "images"], output="embedding", strength=0.02, fidelity_target=0,
             image_mirror=mirror)
    init_s = time.time() - t
    t = time.time()
    issued = api.issue(reg, buyers=buyers, out=root / "out")
    return reg, issued, {"init_s": round(init_s, 1), "issue_s_per_buyer": round((time.time() - t) / buyers, 2),
                         "config": reg.master("den").config.schemes["images"]}


def load(path) -> torch.nn.Module:
    from wmtrace import formats

    model = denoise.build()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in formats.load_tensors(path).items()})
    return model.eval()


def pixels(outputs):
    return [image_files.to_pixels(y) for _, y in outputs]


def read(px):
    return [(i, image_files.from_pixels(p)) for i, p in enumerate(px)]


def local(reg, issued, sc: Scorer) -> dict:
    out: dict = {"copies": [], "edits": [], "innocent": {}}
    master = sc.model
    test = denoise.Pairs("test")
    x = torch.stack([test[i][0] for i in range(len(test))])
    with torch.no_grad():
        ref = denoise.quantize(master(x))
    master_task = denoise.task_psnr(master)
    ids = [b.id for b in issued]
    for b in issued:
        copy = load(b.file)
        with torch.no_grad():
            y = denoise.quantize(copy(x))
        outs = images.run_model(copy, reg, "den")
        single = [sc.score([o], [b.id])[0] for o in outs]
        out["copies"].append({"buyer": b.id, "psnr_to_master": round(denoise.psnr(y, ref), 2),
                              "task_psnr": round(denoise.task_psnr(copy), 3), "master_task_psnr": round(master_task, 3),
                              "single_image_z": single, "single_image_named": sum(map(sc.named, single)),
                              "whitebox": api.trace(b.file, reg).verdict})
    b = issued[0]
    px = pixels(images.run_model(load(b.file), reg, "den"))
    for name, params in EDITS:
        row = {"edit": name, **params}
        edited = edit_images(name, px, seed=1, **params)
        for n in COUNTS:
            z = sc.score(read(edited[:n]), [b.id])[0]
            row[f"z_{n}"], row[f"named_{n}"] = z, sc.named(z)
        out["edits"].append(row)
        print(row, flush=True)
    two = [pixels(images.run_model(load(c.file), reg, "den")) for c in issued[:2]]
    z = sc.score(read(edit_images("average", two)), ids)
    out["average_outputs"] = {"z_colluders": z[:2], "z_others": z[2:], "threshold": round(sc.threshold, 3)}
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "avg.safetensors"
        api.collude([issued[0].file, issued[1].file], "average", merged)
        z = sc.score(images.run_model(load(merged), reg, "den"), ids)
        out["average_weights"] = {"z_colluders": z[:2], "z_others": z[2:]}
    pairs = denoise.Pairs("train", 4096)
    for steps, lr in ((200, 1e-4), (1000, 1e-4), (1000, 1e-3)):
        t = time.time()
        tuned = finetune_images(load(b.file), pairs, steps=steps, lr=lr)
        outs = images.run_model(tuned, reg, "den")
        out.setdefault("finetune", []).append({"steps": steps, "lr": lr, "seconds": round(time.time() - t, 1),
                                               "task_psnr": round(denoise.task_psnr(tuned), 3),
                                               "z_1": sc.score(outs[:1], [b.id])[0], "z_16": sc.score(outs, [b.id])[0]})
        print(out["finetune"][-1], flush=True)
    clean = denoise.Pairs("unseen", 16)
    kernel = torch.tensor([1.0, 4, 6, 4, 1])
    kernel = (kernel[:, None] * kernel[None]) / 256

    def blur(t):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(t, (2, 2, 2, 2), mode="replicate"),
                                          kernel.expand(3, 1, 5, 5), groups=3)

    for what, outs in (("master", images.run_model(master, reg, "den")),
                       ("photographs", [(i, clean[i][1]) for i in range(16)]),
                       ("gaussian_blur_model", images.run_model(blur, reg, "den"))):
        z = sc.score(outs, ids)
        out["innocent"][what] = {"max_z": max(z), "named": sum(map(sc.named, z))}
    return out


def surrogates(reg, issued, sc: Scorer, device: str, pairs: int, steps: int, archs, losses,
               partial: Path) -> list[dict]:
    data = denoise.Pairs("train", pairs, clean=False)
    x = torch.stack([data[i] for i in range(len(data))])
    rows = []
    for arch in archs:
        for loss in losses:
            for b in issued:
                copy = load(b.file).to(device)
                t = time.time()
                sur = surrogate_images(lambda q, c=copy: c(q.to(device)).cpu(), x, arch=arch, loss=loss, steps=steps,
                                       seed=b.id, factory=denoise.build, device=device)
                sur = sur.cpu().eval()
                outs = images.run_model(sur, reg, "den")
                z1, z16 = sc.score(outs[:1], [b.id])[0], sc.score(outs, [b.id])[0]
                row = {"arch": arch, "loss": loss, "buyer": b.id, "seconds": round(time.time() - t, 1),
                       "task_psnr": round(denoise.task_psnr(sur), 3), "z_1": z1, "z_16": z16,
                       "named_1": sc.named(z1), "named_16": sc.named(z16)}
                rows.append(row)
                print(row, flush=True)
                partial.write_text(json.dumps(rows, indent=1))  # a run cut short keeps what it measured
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("local", "surrogates"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--buyers", type=int, default=3)
    ap.add_argument("--crowd", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--archs", default="same,unet,cnn")
    ap.add_argument("--losses", default="l2,l1")
    ap.add_argument("--plain", action="store_true", help="register with --image-plain (not mirror-symmetric)")
    args = ap.parse_args()
    torch.manual_seed(0)
    machine = f"{platform.node()} {platform.processor() or platform.machine()}"
    result = {"command": " ".join(sys.argv), "machine": machine,
              "torch_threads": torch.get_num_threads(), "device": args.device, "date": time.strftime("%Y-%m-%d"),
              "crowd": args.crowd}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        reg, issued, info = register(Path(tmp), args.buyers, not args.plain)
        result.update(info)
        sc = Scorer(reg, args.crowd)
        result["threshold"] = round(sc.threshold, 3)
        if args.part == "local":
            result.update(local(reg, issued, sc))
        else:
            result["surrogates"] = surrogates(reg, issued, sc, args.device, args.pairs, args.steps,
                                              args.archs.split(","), args.losses.split(","),
                                              Path(args.out + ".partial"))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
