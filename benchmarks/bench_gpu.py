"""The one-shot GPU check (benchmarks/gpu_check.sh runs it): what memscan's CUDA paths do on one GPU.

    python benchmarks/bench_gpu.py                  # on a GPU machine: results/gpu.{md,json}
    python benchmarks/bench_gpu.py --tiny --out DIR # the CPU-possible part at tiny size (CI): DIR/gpu.{md,json}

1. A one-shard `memscan scan --config laion-sd15` through load_score_model with model.dtype float16 and bfloat16
   (a Stable Diffusion layout saved with save_pretrained and loaded with from_pretrained, random weights): exit
   status, rows scored, the device each stage ran on (summary.json), the largest relative difference of every
   score column between the two dtypes.
2. The inverted-file kNN of the corpus steps (scanner.corpus.search) on the GPU (faiss.knn_gpu / k-means on the
   GPU where faiss sees one): recall@k against exact search, and seconds.
3. Scoring throughput for the laion-sd15 column set, in images per second per GPU, with an SD-1.5-sized UNet
   (860 M parameters) and VAE built from their configs with random weights (nothing downloaded), beside the cost
   of one UNet forward of the same batch: the ratio is what the geometry costs in forwards.

--tiny builds a tiny SD layout (16 px) instead, so the same code runs on a CPU in about a minute: its numbers
measure nothing, its exit status says the paths work. The machine, the GPU and the torch build are recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

CHAR_VOCAB = {c: i for i, c in enumerate(["<|startoftext|>", "<|endoftext|>"] + [chr(c) for c in range(97, 123)]
                                          + [chr(c) + "</w>" for c in range(97, 123)] + [" ", "</w>"])}

SIZES = {
    # SD v1.5's UNet and VAE configs (what the v1.5 checkout's unet/ and vae/ config.json say)
    "sd15": {"resolution": 512, "batch": 8, "images": 64,
             "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32,
                     "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                     "sample_size": 512},
             "unet": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                      "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
                      "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                      "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3},
             "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "max_position_embeddings": 77}},
    "tiny": {"resolution": 16, "batch": 4, "images": 8,
             "vae": {"block_out_channels": (8, 8), "layers_per_block": 1, "norm_num_groups": 8,
                     "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
                     "sample_size": 16},
             "unet": {"sample_size": 8, "block_out_channels": (8, 16), "layers_per_block": 1,
                      "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 8,
                      "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                      "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D")},
             "text": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "max_position_embeddings": 77}},
}


def build_sd(root: Path, size: str) -> Path:
    """A Stable Diffusion checkout's layout (vae/, unet/, text_encoder/, tokenizer/, scheduler/, model_index.json)
    with random weights at `size`, saved with save_pretrained (safetensors), as memscan loads a real one."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from scanner.demo.latent import model_index

    s = SIZES[size]
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **s["vae"]).save_pretrained(root / "vae")
    UNet2DConditionModel(in_channels=4, out_channels=4, **s["unet"]).save_pretrained(root / "unet")
    CLIPTextModel(CLIPTextConfig(vocab_size=max(len(CHAR_VOCAB), 64), bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                 **s["text"])).save_pretrained(root / "text_encoder")
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(CHAR_VOCAB))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  skip_prk_steps=True, steps_offset=1).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(model_index("PNDMScheduler")))
    return root


def scan_check(model: Path, shard_dir: Path, work: Path, size: str, dtypes: list[str]) -> dict:
    """`memscan scan --config laion-sd15` on one shard per dtype; columns compared across dtypes."""
    import pandas as pd

    res: dict = {}
    scores = {}
    for dtype in dtypes:
        out = work / f"scan-{dtype}"
        args = [sys.executable, "-m", "scanner", "scan", "--config", "laion-sd15", "--shards", str(shard_dir),
                "--set", f"model.path={model}", "--set", f"model.dtype={dtype}", "--set",
                f"data.resolution={SIZES[size]['resolution']}", "--set", "neighbours.enabled=false",
                "--set", f"model.batch_size={SIZES[size]['batch']}", "--no-progress", "--out", str(out)]
        t0 = time.time()
        p = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
        r = {"exit": p.returncode, "seconds": round(time.time() - t0, 1)}
        if p.returncode == 0:
            summary = json.loads((out / "summary.json").read_text())
            r.update(scored=summary["counts"]["scored"], seen=summary["counts"]["seen"],
                     devices={k: v.get("devices") for k, v in summary["stages"].items() if v.get("devices")},
                     warnings=sorted({w for v in summary["stages"].values() for w in v.get("warnings", [])}))
            scores[dtype] = pd.read_parquet(out / "scores").set_index("key").sort_index()
        else:
            r["log_tail"] = p.stdout[-2000:]
        res[dtype] = r
    if len(scores) == 2:
        a, b = scores.values()
        cols = [c for c in a.columns if pd.api.types.is_float_dtype(a[c]) and a[c].notna().any()]
        res["max_rel_diff_between_dtypes"] = {
            c: float(np.nanmax(np.abs(a[c] - b[c]) / np.maximum(np.abs(a[c]), 1e-6))) for c in cols}
    return res


def ivf_check(work: Path, n: int, dim: int = 128) -> dict:
    """The corpus steps' inverted file over synthetic unit vectors written as part files: recall@k, seconds."""
    import faiss
    import pandas as pd

    from scanner.config import ScanConfig
    from scanner.corpus.search import make_plan, search, search_knobs
    from scanner.corpus.store import PartStore

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((max(16, n // 200), dim)).astype(np.float32)  # clustered, as embeddings are
    shards, per = [], 50_000
    for i in range(0, n, per):
        name = f"{i // per:05d}"
        m = min(per, n - i)
        x = centres[rng.integers(0, len(centres), m)] + 0.3 * rng.standard_normal((m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        (work / "parts").mkdir(parents=True, exist_ok=True)
        (work / "embeddings").mkdir(exist_ok=True)
        pd.DataFrame({"key": [f"{name}-{j}" for j in range(len(x))]}).to_parquet(work / "parts" / f"{name}.parquet")
        np.save(work / "embeddings" / f"{name}.npy", x.astype(np.float16))
        shards.append(name)
    from scanner.corpus.executor import LocalExecutor
    from scanner.storage import Out

    cfg = ScanConfig()
    cfg.neighbours.index = "ivf"
    store = PartStore(work, shards)
    plan = make_plan(store.n, dim, 11, "ip", search_knobs(cfg), cfg.corpus.budget_bytes)
    t0 = time.time()
    _, info = search(store, "embeddings", lambda i: np.ones(int(store.sizes[i]), bool), plan, lambda *a: None,
                     LocalExecutor(), recall_sample=500, side=(Out(work), "recall"))
    return {"faiss_gpus": faiss.get_num_gpus(), "n": n, "dim": dim, "nlist": info["nlist"],
            "recall_at_k": info["recall_at_k"], "seconds": round(time.time() - t0, 1), "phases": info["seconds"]}


def throughput(model_dir: Path, size: str, reps: int = 3) -> dict:
    """Images per second of compute_scores for the laion-sd15 columns, and one UNet forward of the same batch."""
    import torch

    from scanner.config import load_config, shipped_config
    from scanner.geometry.scores import compute_scores, score_columns
    from scanner.geometry.trace import row_seeds
    from scanner.models.loading import load_score_model

    cfg = load_config(shipped_config("laion-sd15"), [f"model.path={model_dir}",
                                                     f"data.resolution={SIZES[size]['resolution']}"])
    model = load_score_model(cfg.model)
    dev = next(model.unet.parameters()).device
    b, res = SIZES[size]["batch"], SIZES[size]["resolution"]
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (b, res, res, 3), dtype=np.uint8))
    x = model.encode_images(images)
    cond = model.encode_text(["a photo of a cat"] * b)
    seeds = row_seeds([f"k{i}" for i in range(b)], 0)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up (kernels, allocator)
        sync()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best

    t = torch.full((b,), cfg.geometry.t_laplace, device=x.device)
    with torch.no_grad():
        fwd = timed(lambda: model.eps(x, t, cond))
    score = timed(lambda: compute_scores(model, x, cfg.geometry, cond, seeds=seeds))
    return {"device": str(dev), "dtype": str(next(model.unet.parameters()).dtype), "batch": b,
            "columns": score_columns(cfg.geometry, True), "unet_params_m": round(
                sum(p.numel() for p in model.unet.parameters()) / 1e6, 1),
            "forward_s": round(fwd, 4), "scoring_s": round(score, 4), "img_per_s": round(b / score, 2),
            "scoring_in_forwards": round(score / fwd, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny SD layout: the CPU-possible part (CI)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder of gpu.md / gpu.json")
    a = ap.parse_args()
    import torch

    from scanner.demo.corpus import build_demo_corpus
    from scanner.procfs import machine

    size = "tiny" if a.tiny else "sd15"
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "size": size, "machine": machine(threads=False),
                 "torch": torch.__version__, "cuda": torch.version.cuda,
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with tempfile.TemporaryDirectory(prefix="memscan-gpu-") as tmp:
        work = Path(tmp)
        model = build_sd(work / "sd", size)
        corpus = build_demo_corpus(work / "corpus", n_unique=SIZES[size]["images"], n_repeated=1, repeat_copies=2,
                                   n_oversampled=1, n_exact_dup_groups=1, n_near_dup_groups=1, n_corrupt=1,
                                   n_no_caption=1, samples_per_shard=9999, truncate_last_shard=False, seed=0,
                                   n_heldout=0, captions="unique")
        shard_dir = work / "one_shard"
        shard_dir.mkdir()
        corpus.shards[0].rename(shard_dir / corpus.shards[0].name)
        dtypes = ["float16", "bfloat16"] if torch.cuda.is_available() else ["float16"]
        res["scan"] = scan_check(model, shard_dir, work, size, dtypes)
        res["ivf"] = ivf_check(work / "ivf", 20_000 if a.tiny else 1_000_000)
        res["throughput"] = throughput(model, size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    t, s, v = res["throughput"], res["scan"], res["ivf"]
    lines = [f"# GPU check ({res['date']}, {size})", "",
             (f"`benchmarks/gpu_check.sh` (`python benchmarks/bench_gpu.py{' --tiny' if a.tiny else ''}`). "
              f"Device: {res['gpu'] or 'no GPU (CPU)'}; torch {res['torch']} (CUDA build {res['cuda']})."), "",
             "| check | result |", "|---|---|"]
    for d in dtypes:
        r = s[d]
        lines.append(f"| one-shard `memscan scan --config laion-sd15`, model.dtype {d} | exit {r['exit']}, "
                     f"{r.get('scored', 0)} of {r.get('seen', '?')} scored in {r['seconds']} s; devices "
                     f"{r.get('devices')}{'; warnings: ' + '; '.join(r['warnings']) if r.get('warnings') else ''} |")
    if "max_rel_diff_between_dtypes" in s:
        worst = max(s["max_rel_diff_between_dtypes"].items(), key=lambda kv: kv[1])
        lines.append(f"| float16 vs bfloat16, largest relative difference | {worst[0]}: {worst[1]:.2e} |")
    lines += [(f"| inverted-file kNN, {v['n']:,} x {v['dim']} (faiss GPUs: {v['faiss_gpus']}) | recall@k "
               f"{v['recall_at_k']}, {v['nlist']} lists, {v['seconds']} s |"),
              (f"| scoring, {len(t['columns'])} laion-sd15 columns, UNet {t['unet_params_m']} M params, batch "
               f"{t['batch']}, {t['device']} {t['dtype']} | {t['img_per_s']} img/s; one forward {t['forward_s']} s; "
               f"scoring = {t['scoring_in_forwards']} forwards |")]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    failed = [d for d in dtypes if s[d]["exit"] != 0]
    if failed:
        sys.exit(f"bench_gpu: the scan failed with model.dtype {failed}")


if __name__ == "__main__":
    main()
