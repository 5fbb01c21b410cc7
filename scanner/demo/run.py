"""`memscan demo`: build the embedded corpus, train the demo model (both cached), scan, evaluate."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("memscan")


# `memscan demo --quick`: the same commands on a corpus and training budget small enough to finish in a few
# minutes on a laptop CPU (and in the tests); the scan, tables and report are real, the metrics mean little.
# Its 3 near-duplicate groups keep the four edits of the demo before issue #34 (a handful of members cannot show every
# edit, and the other edits draw other random numbers: the corpus's sizes, and with them the >= 100 scored rows the
# members' cut needs, stay those the quick tests were written for).
QUICK_CORPUS = {"n_unique": 60, "n_repeated": 2, "repeat_copies": 10, "n_oversampled": 2, "n_exact_dup_groups": 3,
                "n_near_dup_groups": 3, "n_corrupt": 2, "n_no_caption": 3, "samples_per_shard": 40, "n_heldout": 100,
                "near_dup_edits": ("jpeg", "shift", "color", "resize")}
QUICK_STEPS = 10  # demo-model optimizer steps
# `memscan demo --dose`: 4 more groups at each of these copy counts (planted "dose"), for the dose-response
DOSE_COPIES = (2, 4, 8, 16, 32)
QUICK_OVERRIDES = ["neighbours.train_steps=10", "neighbours.generations=4", "neighbours.gen_steps=4",
                   "geometry.probes=2", "geometry.lpca_k=5"]
QUICK_LATENT_STEPS = (10, 10)  # (VAE, UNet) steps of `memscan demo --model latent --quick`
# model kind -> (the corpus's caption mode, the shipped config the scan runs with)
DEMO_MODELS = {"pixel": ("template", "demo"), "latent": ("unique", "demo-latent")}


def _check_kind(kind: str) -> None:
    if kind not in DEMO_MODELS:
        raise ValueError(f"the demo model must be one of {sorted(DEMO_MODELS)}, got {kind!r}")


def ensure_demo_corpus(out: Path, seed: int = 0, quick: bool | None = False, dose: bool = False,
                       captions: str = "template") -> Path:
    """out/corpus, built when missing; a cached one must be of this seed, dose and caption mode, and (quick not None)
    of this size: the quick corpus with QUICK_CORPUS's held-out set, or the full one with HELDOUT_IMAGES (another
    held-out size is rebuilt in place). quick None takes a cached corpus of either size (train-demo trains on what
    is there) and builds the full one."""
    from scanner.demo.corpus import HELDOUT_IMAGES, build_demo_corpus

    corpus = out / "corpus"
    if (corpus / "truth.parquet").exists():
        params = json.loads((corpus / "demo_corpus.json").read_text()).get("params", {})
        want = {"seed": seed, "dose_copies": list(DOSE_COPIES) if dose else None, "captions": captions,
                "quick": quick, "n_heldout": QUICK_CORPUS["n_heldout"] if quick else HELDOUT_IMAGES}
        have = {"seed": params.get("seed", 0), "dose_copies": params.get("dose_copies"),
                "captions": params.get("captions", "template"),
                "quick": params.get("n_unique") == QUICK_CORPUS["n_unique"],
                "n_heldout": params.get("n_heldout", 500)}  # corpora built before 2026-11-30 held 500
        if quick is None:
            want.update(quick=have["quick"], n_heldout=have["n_heldout"])
        if {**want, "n_heldout": None} != {**have, "n_heldout": None}:
            raise ValueError(f"{corpus} holds a demo corpus built with {have}, not {want}: use another --out")
        if want["n_heldout"] != have["n_heldout"]:  # the corpus is the same for any n_heldout: only heldout/ changes
            _rebuild_heldout(corpus, params, want["n_heldout"])
        log.info("demo corpus: cached at %s", corpus)
        return corpus
    t0 = time.time()
    build_demo_corpus(corpus, seed=seed, captions=captions, **(QUICK_CORPUS if quick else {}),
                      **({"dose_copies": DOSE_COPIES} if dose else {}))
    log.info("demo corpus: built in %.1f s at %s", time.time() - t0, corpus)
    return corpus


def _rebuild_heldout(corpus: Path, params: dict, n_heldout: int) -> None:
    """Give a cached demo corpus today's held-out shard: the corpus built again beside it with n_heldout, checked
    byte for byte against the cached shards, and its heldout/ and manifest moved in (the model stays valid)."""
    import shutil

    from scanner.demo.corpus import build_demo_corpus_again

    t0 = time.time()
    tmp = corpus.parent / "corpus.heldout-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_demo_corpus_again(corpus, tmp, n_heldout=n_heldout)
        shutil.rmtree(corpus / "heldout", ignore_errors=True)
        os.replace(tmp / "heldout", corpus / "heldout")
        os.replace(tmp / "demo_corpus.json", corpus / "demo_corpus.json")
    except ValueError as e:
        raise ValueError(f"{e}: use another --out") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("demo corpus: its held-out shard rebuilt with %d images (was %d) in %.1f s, the shards unchanged",
             n_heldout, params.get("n_heldout", 500), time.time() - t0)


def ensure_demo_model(out: Path, minutes: float | None = None, seed: int = 0, progress: bool = True,
                      steps: int | None = None, quick: bool | None = False, dose: bool = False,
                      kind: str = "pixel") -> Path:
    """out/model, trained on out/corpus (built first with `seed` if missing) unless a finished model is there.

    Training runs `steps` seeded optimizer steps (None: DEMO_STEPS, or QUICK_STEPS with `quick`), so every
    machine trains the same model; `minutes` (None: no cap) may stop it earlier, with a warning.
    kind "latent": a tiny text-to-image Stable Diffusion (scanner.demo.latent) on a corpus with unique captions.
    """
    from scanner.demo.train import DEMO_STEPS, train_demo

    _check_kind(kind)
    corpus = ensure_demo_corpus(out, seed, quick=quick, dose=dose, captions=DEMO_MODELS[kind][0])
    model = out / "model"
    if (model / "train_info.json").exists():  # written last: its presence means the model is complete
        have = json.loads((model / "train_info.json").read_text()).get("kind", "pixel")
        if have != kind:
            raise ValueError(f"{model} holds a {have} demo model, not {kind}: use another --out")
        log.info("demo model: cached at %s", model)
        return model
    if kind == "latent":
        from scanner.demo.latent import LATENT_STEPS, LATENT_VAE_STEPS, train_latent_demo

        vae_steps, steps = (QUICK_LATENT_STEPS if quick else (LATENT_VAE_STEPS, steps or LATENT_STEPS))
        log.info("demo model (latent): training a %d-step VAE and a %d-step text-conditional UNet on this machine%s "
                 "(cached afterwards)", vae_steps, steps, f", stopping early after {minutes:g} minutes" if minutes else "")
        return train_latent_demo(corpus, model, steps=steps, vae_steps=vae_steps, seed=seed, progress=progress,
                                 time_budget_s=minutes * 60 if minutes else None)
    steps = (QUICK_STEPS if quick else DEMO_STEPS) if steps is None else steps
    log.info("demo model: training %d seeded steps on this machine%s (cached afterwards)", steps,
             f", stopping early after {minutes:g} minutes" if minutes else "")
    train_demo(corpus, model, seed=seed, steps=steps, time_budget_s=minutes * 60 if minutes else None,
               progress=progress)
    return model


def run_demo(out: Path, minutes: float | None = None, overrides: list[str] | None = None, progress: bool = True,
             quick: bool = False, seed: int = 0, steps: int | None = None, dose: bool = False,
             kind: str = "pixel") -> int:
    from scanner.config import load_config, shipped_config
    from scanner.demo.evaluate import evaluate, format_metrics
    from scanner.pipeline import run_scan

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_demo_model(out, minutes, seed=seed, progress=progress, steps=steps, quick=quick, dose=dose,
                              kind=kind)
    info = json.loads((model / "train_info.json").read_text()) if (model / "train_info.json").exists() else {}
    base = [f"data.shards={out / 'corpus' / 'shards'}", f"model.path={model}"]
    if "resolution" in info:
        base.append(f"data.resolution={info['resolution']}")
    if "channels" in info:
        base.append(f"data.channels={info['channels']}")
    heldout = out / "corpus" / "heldout"
    if any(heldout.glob("*.tar")):  # images the model never saw: the detector's cut is a 1 % FPR on them
        base.append(f"classify.calibration_shards={heldout}")
    else:
        log.info("demo: %s has no held-out shard (a corpus cached by an older memscan): the detector keeps the "
                 "config's fixed cut", out / "corpus")
    cfg = load_config(shipped_config(DEMO_MODELS[kind][1]), base + (QUICK_OVERRIDES if quick else []) + list(overrides or []))
    scan_dir = out / "scan"
    if cfg.neighbours.enabled and not cfg.neighbours.clip_checkpoint and cfg.neighbours.train_embedder:
        # With neighbours.train_embedder, the embedder is trained here before the scan starts Ray, so it has the CPU
        # to itself (without it the scan takes the shipped one and says so) (measured: about 2 min alone, about 4 min beside an idle local Ray); the scan then
        # finds it cached in scan/embedder.
        from scanner.data.shards import expand_shards
        from scanner.neighbours.run import ensure_embedder

        scan_dir.mkdir(parents=True, exist_ok=True)
        ensure_embedder(expand_shards(cfg.data.shards), scan_dir, cfg.neighbours, log=log.info)
    run_scan(cfg, scan_dir, progress=progress)
    metrics = evaluate(scan_dir, out / "corpus" / "truth.parquet")
    from scanner.report import write_report

    report = write_report(scan_dir, out / "corpus" / "truth.parquet")
    print(format_metrics(metrics))
    print(f"memscan demo: done in {time.time() - t0:.0f} s; scan results in {scan_dir} "
          f"(scores/, removal_list.parquet, errors.parquet, summary.json, metrics.json); report: {report}")
    return 0
