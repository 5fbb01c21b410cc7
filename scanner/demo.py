"""`memscan demo`: build the embedded corpus, train the demo model (both cached), scan, evaluate."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger("memscan")


def ensure_demo_corpus(out: Path, seed: int = 0) -> Path:
    from scanner.data.demo import build_demo_corpus

    corpus = out / "corpus"
    if (corpus / "truth.parquet").exists():
        log.info("demo corpus: cached at %s", corpus)
        return corpus
    t0 = time.time()
    build_demo_corpus(corpus, seed=seed)
    log.info("demo corpus: built in %.1f s at %s", time.time() - t0, corpus)
    return corpus


def ensure_demo_model(out: Path, minutes: float = 10.0, seed: int = 0, progress: bool = True) -> Path:
    from scanner.demo_train import train_demo

    corpus = ensure_demo_corpus(out, seed)
    model = out / "model"
    if (model / "unet" / "config.json").exists() and (model / "scheduler").exists():
        log.info("demo model: cached at %s", model)
        return model
    log.info("demo model: training for up to %.0f minutes on this machine (cached afterwards)", minutes)
    train_demo(corpus, model, seed=seed, time_budget_s=minutes * 60, progress=progress)
    return model


def run_demo(out: Path, minutes: float = 10.0, overrides: list[str] | None = None, progress: bool = True) -> int:
    from scanner.config import load_config, shipped_config
    from scanner.evaluate import evaluate, format_metrics
    from scanner.pipeline import run_scan

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_demo_model(out, minutes, progress=progress)
    info = json.loads((model / "train_info.json").read_text()) if (model / "train_info.json").exists() else {}
    base = [f"data.shards={out / 'corpus' / 'shards'}", f"model.path={model}"]
    if "resolution" in info:
        base.append(f"data.resolution={info['resolution']}")
    if "channels" in info:
        base.append(f"data.channels={info['channels']}")
    cfg = load_config(shipped_config("demo"), base + list(overrides or []))
    scan_dir = out / "scan"
    if cfg.neighbours.enabled and not cfg.neighbours.clip_checkpoint:
        # Trained here, before the scan starts Ray, so it has the CPU to itself (measured: about 2 min alone,
        # about 4 min beside an idle local Ray); the scan then finds it cached in scan/embedder.
        from scanner.data.shards import expand_shards
        from scanner.neighbours.run import ensure_embedder

        scan_dir.mkdir(parents=True, exist_ok=True)
        ensure_embedder(expand_shards(cfg.data.shards), scan_dir, cfg.neighbours, log=log.info)
    run_scan(cfg, scan_dir, progress=progress)
    metrics = evaluate(scan_dir, out / "corpus" / "truth.parquet")
    from scanner.report.html import write_report

    report = write_report(scan_dir, out / "corpus" / "truth.parquet")
    print(format_metrics(metrics))
    print(f"memscan demo: done in {time.time() - t0:.0f} s; scan results in {scan_dir} "
          f"(scores/, removal_list.parquet, errors.parquet, summary.json, metrics.json); report: {report}")
    return 0
