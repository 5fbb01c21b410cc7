"""Every command the README and `memscan --help` show, run as a user types it: a subprocess, its exit code,
the files docs/outputs.md promises.

The commands are read out of README.md's code blocks and the --help epilog, so a command added there
without a test here fails `test_every_shown_command_is_run`. Each is run as written, apart from paths
(runs/demo -> the quick demo this module builds, /data/laion -> its shards, /models/... -> tiny local
models), sizes (`--quick`, fewer steps, smaller images) and, for some, the Ray they run on (ON_SESSION_RAY):
`sized` appends the size flags, and `test_flags_as_written` checks that every flag the README uses is passed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from out_tables import assert_same_out

from scanner.cli import EPILOG

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUNNERS = ("memscan ", "ray job submit ", "RAY_ADDRESS=", "pytest")


def shown_commands() -> list[str]:
    """Commands in README.md's bash blocks, the `$ ` lines of its plain blocks (the rest is output) and the
    --help epilog; continuation lines joined, comments and prompts dropped, `a && b` split."""
    lines = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", README.read_text(), re.DOTALL):
        body = body.replace("\\\n", " ").splitlines()
        lines += body if lang == "bash" else [ln[2:] for ln in body if ln.startswith("$ ")] if lang == "" else []
    cmds = set()
    for line in lines + EPILOG.splitlines():
        line = re.sub(r"\s+#.*$", "", line.strip())
        for seg in line.split("&&"):
            seg = " ".join(seg.split())
            if seg.startswith(RUNNERS):
                cmds.add(seg)
    return sorted(cmds)


# Shown commands that cannot run here, each with where else it is checked.
NOT_RUN_HERE = {
    "pytest -q": ".ci/run runs it (this file is part of it)",
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`memscan demo --out DIR --quick`, once: its corpus, model, embedder and scan feed the other commands."""
    out = tmp_path_factory.mktemp("readme") / "demo"
    proc = run(["memscan", "demo", "--out", str(out), "--quick"])
    assert proc.returncode == 0, proc.stdout[-4000:]
    # column, vs, AUROC, its 95 % interval, TPR at 1 % and at 0.1 % FPR, direction
    assert re.search(r"^loss_cal +repeated +\d\.\d{3} +\d\.\d{3}-\d\.\d{3} +\d\.\d{3} +\d\.\d{3} +(low|high)$",
                     proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"memscan demo: done in \d+ s; scan results in .*report: .*report\.html", proc.stdout)
    return out


def path_map(demo: Path, tmp: Path, sd: str, embedder: str) -> dict[str, str]:
    """README path -> the path a test uses (longest prefixes first)."""
    return {"runs/demo": str(demo), "runs/": f"{tmp}/runs/", "/data/laion/{00000..00099}.tar":
            f"{demo}/corpus/shards/{{00000..00002}}.tar", "/models/stable-diffusion-v1-5": sd,
            # the demo's scan uses the embedder memscan ships (it trains none): it stands in for a CLIP checkpoint
            "/models/open_clip/ViT-L-14/open_clip_model.safetensors": embedder,
            "/scans/": f"{tmp}/scans/", "/shared/scans/": f"{tmp}/shared/",
            # object storage: local folders here, the real bucket (the s3_server fixture) in the S3 cases
            S3_SHARDS: f"{demo}/corpus/shards/{{00000..00002}}.tar", "s3://my-bucket/scans/": f"{tmp}/s3scans/",
            # new shards for --against (week2_shard: the held-out images under keys of their own), and a reference
            # set (the held-out images as they are)
            "/data/laion/{00100..00109}.tar": f"{tmp}/week2/{{00100..00100}}.tar",
            "/data/eval/*.tar": f"{demo}/corpus/heldout/*.tar"}


@pytest.fixture(scope="module")
def paths(demo, tmp_path_factory, tiny_sd_dir) -> dict[str, str]:
    from scanner.neighbours.run import shipped_embedder

    tmp = tmp_path_factory.mktemp("readme_out")
    week2_shard(demo / "corpus" / "heldout" / "00000.tar", tmp / "week2" / "00100.tar")
    return path_map(demo, tmp, str(tiny_sd_dir), shipped_embedder())


def week2_shard(src: Path, dst: Path) -> None:
    """A shard of new images for the README's --against command: the quick demo's held-out images (never in its
    corpus) under keys of their own (the demo numbers both sets from 0)."""
    import io
    import tarfile

    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tf, tarfile.open(dst, "w") as out:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            info = tarfile.TarInfo("w2-" + m.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


S3_SHARDS = "s3://my-bucket/laion/{00000..00099}.tar"


DEDUP = "memscan dedup --shards '/data/laion/{00000..00099}.tar' --out /scans/dedup"
AGAINST = "memscan dedup --shards '/data/laion/{00100..00109}.tar' --against /scans/dedup --out /scans/dedup-week2"
REFERENCE = ("memscan dedup --shards '/data/laion/{00000..00099}.tar' --reference '/data/eval/*.tar' "
             "--out /scans/dedup-clean")
DEDUP_S3 = "memscan dedup --shards 's3://my-bucket/laion/{00000..00099}.tar' --out s3://my-bucket/scans/dedup"


# Commands run on the session's Ray (RAY_ADDRESS, as on a node of a cluster) rather than a Ray of their own: the
# command is the one typed, and a local Ray's start and stop (about 10 s each on 2 cores) is exercised by the
# commands a user runs first (demo, demo --model latent) and the bucket dedup (whose Ray workers read the bucket
# with the driver's AWS_* environment). The laion-sd15 scan's three forms (plain, with RAY_ADDRESS typed, and as a
# submitted job, whose entry point the job server runs with RAY_ADDRESS set to its cluster) all run on it.
ON_SESSION_RAY = {"scan", "scan-sd", "dedup", "against", "reference"}


@pytest.fixture(scope="module")
def local_dedup(paths, ray_session) -> Path:
    """The README's local dedup, run once as typed: its own case checks its files, and the S3 case compares the
    bucket's --out with it (the same shards, read from the bucket, must give the same files and tables)."""
    argv = sized(localize(DEDUP, paths), paths)
    run_ok(argv, ray_address=ray_session.get_runtime_context().gcs_address)
    return Path(argv[argv.index("--out") + 1])


def s3_paths(paths: dict[str, str], demo: Path, s3_server) -> dict[str, str]:
    """The README's bucket on the local S3 server: the quick demo's shards uploaded under laion/, a fresh scans/."""
    import uuid

    url = s3_server.upload(demo / "corpus" / "shards", "my-bucket", "laion")
    return {**paths, S3_SHARDS: url + "/{00000..00002}.tar", "s3://my-bucket/scans/":
            f"s3://my-bucket/scans-{uuid.uuid4().hex[:8]}/"}


def fetch(url: str, local: Path) -> Path:
    """An --out in the bucket, copied to a local folder for the checks (read as any user's pandas would)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.get(root.rstrip("/") + "/", str(local), recursive=True)
    return local


def run(argv: list[str], cwd: Path = ROOT, ray_address: str | None = None) -> subprocess.CompletedProcess:
    """argv as typed, with `memscan` and `python` resolved to this interpreter (the tests' environment);
    RAY_ADDRESS is the given cluster's or unset (a local Ray, as on a user's fresh machine)."""
    if argv[0] == "memscan":
        argv = [sys.executable, "-m", "scanner", *argv[1:]]
    elif argv[0] in ("python", "python3"):
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False,
                          timeout=900, env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                            "PYTHONUNBUFFERED": "1", **({"RAY_ADDRESS": ray_address} if ray_address else {})})


def run_ok(argv: list[str], ray_address: str | None = None) -> subprocess.CompletedProcess:
    """run(), which must exit 0 without a traceback, on the given cluster (and say so) or on a local Ray."""
    proc = run(argv, ray_address=ray_address)
    assert proc.returncode == 0, (argv, proc.stdout[-4000:])
    assert ("connected to the Ray cluster at" in proc.stdout) == bool(ray_address), proc.stdout[-4000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-4000:]
    return proc


def localize(cmd: str, paths: dict[str, str]) -> list[str]:
    out = []
    for tok in shlex.split(cmd):
        for a, b in sorted(paths.items(), key=lambda kv: -len(kv[0])):
            if a in tok:
                tok = tok.replace(a, b)
                break
        out.append(tok)
    if out[:3] == ["ray", "job", "submit"]:  # the job's entry point, run by this machine's Python
        out = out[out.index("--") + 1:]
    return out


# Size flags per (sub)command: smaller models, steps and images, never other behaviour.
SD_SIZES = ["--set", "data.resolution=16", "--set", "neighbours.image_size=32", "--set", "neighbours.generations=2",
            "--set", "neighbours.gen_steps=2", "--set", "geometry.probes=1", "--set", "model.batch_size=16"]
SIZES = {"scan": ["--set", "geometry.probes=1", "--set", "neighbours.train_steps=10", "--set",
                  "neighbours.generations=2", "--set", "neighbours.gen_steps=2", "--no-progress"],
         "dedup": ["--train-steps", "10", "--no-progress"],
         "train-embedder": ["--steps", "5"], "train-demo": ["--steps", "3"], "build-demo-corpus": ["--n-unique", "20", "--n-heldout", "50"],
         "demo": ["--quick", "--no-progress"]}


def sized(argv: list[str], paths: dict[str, str]) -> list[str]:
    """argv with the size flags of its command; a laion-sd15 run also gets the config's own paths (model,
    checkpoint, shards: /models/..., /data/laion/...) localized when the command does not set them."""
    sub = "scan" if argv[:2] == ["python", "jobs/scan.py"] else argv[1]
    extra = list(SIZES.get(sub, []))
    if "laion-sd15" in argv or "configs/laion-sd15.yaml" in argv:
        extra += SD_SIZES
        for key, path in (("model.path", "/models/stable-diffusion-v1-5"),
                          ("neighbours.clip_checkpoint", "/models/open_clip/ViT-L-14/open_clip_model.safetensors")):
            if not any(a.startswith(key + "=") for a in argv):
                extra += ["--set", f"{key}={paths[path]}"]
        if "--shards" not in argv:  # the config's data.shards
            extra += ["--shards", paths["/data/laion/{00000..00099}.tar"]]
    return argv + extra


def test_every_shown_command_is_run():
    """A command the README or --help gains must get a case here (or a reason in NOT_RUN_HERE)."""
    shown = set(shown_commands())
    handled = set(CASES) | set(NOT_RUN_HERE)
    assert shown == handled, {"shown, not tested": sorted(shown - handled), "tested, no longer shown": sorted(
        handled - shown)}


def test_flags_as_written():
    """Every flag and config key a shown command uses is in what the test runs."""
    paths = path_map(Path("/DEMO"), Path("/TMP"), "/SD", "/EMBEDDER")
    for cmd in CASES:
        argv = sized(localize(cmd, paths), paths)
        typed = shlex.split(cmd)
        if typed[:3] == ["ray", "job", "submit"]:  # ray's own flags stay with ray: the job is what runs here
            typed = typed[typed.index("--") + 1:]
        for tok in typed:
            if tok.startswith("--") or re.match(r"^[a-z_]+\.[a-z_]+=", tok):
                assert any(t == tok or t.startswith(tok.split("=")[0] + "=") for t in argv), (cmd, tok)


# ---------------------------------------------------------------------------------------------------------------
# what each command promises (docs/outputs.md)

SCORE_COLUMNS = ["key", "shard", "caption", "width", "height", "lid_flipd", "lid_nb", "lid_lpca", "lid_gap",
                 "lid_gap_rel", "p_laplace_1", "p_laplace_2", "score_norm", "score_norm_cal", "loss_cal", "cfg_norm",
                 "mem_class", "verdict", "error"]


def check_scan(out: Path, conditional: bool = False) -> None:
    scores = pd.read_parquet(out / "scores")  # the README's pandas line: every shard at once
    assert set(SCORE_COLUMNS) <= set(scores.columns) and len(scores) > 0
    assert not scores["key"].duplicated().any()
    good = scores[scores["error"].isna()]
    assert len(good) > 0 and good["score_norm"].notna().all() and good["lid_lpca"].notna().all()
    assert set(good["mem_class"]) <= {"od", "dd", "none"}
    assert set(good["verdict"]) <= {"confirmed", "suspected", "duplicate", "clear"}
    if conditional:
        assert good["cfg_norm"].notna().all()
    check_dedup(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["seen"] == len(scores) and "versions" in summary and "config" in summary
    assert (out / "report.html").stat().st_size > 10_000


def check_dedup(out: Path) -> None:
    dups = pd.read_parquet(out / "duplicates.parquet")
    assert {"key", "group_id", "similarity", "keep"} <= set(dups.columns)
    assert dups.groupby("group_id")["keep"].sum().eq(1).all()
    removal = pd.read_parquet(out / "removal_list.parquet")
    assert list(removal.columns) == ["key", "shard", "url", "reason", "matched_key", "matched_url"]
    assert set(removal["reason"]) <= {"reference", "duplicate", "od_mem", "dd_mem", "replicated"}
    grouped = removal["reason"].isin(["reference", "duplicate"])
    assert removal.loc[grouped, "matched_key"].notna().all() and removal.loc[~grouped, "matched_key"].isna().all()
    assert (out / "removal_list.txt").read_text().split() == removal["key"].tolist()
    errors = pd.read_parquet(out / "errors.parquet")
    assert list(errors.columns) == ["key", "shard", "stage", "error"] and errors["error"].notna().all()
    assert json.loads((out / "summary.json").read_text())["counts"]["removed"] == len(removal)


def check_against(out: Path, old: Path) -> None:
    """Week 2 against the README's dedup: only its shard scored and listed, the chain recorded."""
    check_dedup(out)
    s = json.loads((out / "summary.json").read_text())
    assert [a["out"] for a in s["against"]] == [str(old)]
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["00100.parquet"]
    assert s["corpus"]["rows_by_role"]["old"] == json.loads((old / "summary.json").read_text())["corpus"]["rows"]
    rem = pd.read_parquet(out / "removal_list.parquet")
    assert set(rem["shard"]) <= {"00100"}
    assert not (out / "parts" / "00000.parquet").exists()


def check_reference(out: Path) -> None:
    """The README's dedup with the held-out images as a reference set: they are embedded under --out/reference/,
    never scored nor listed."""
    check_dedup(out)
    s = json.loads((out / "summary.json").read_text())
    assert s["reference"] and s["reference"][0]["shards"] == 1
    assert (out / "reference" / "0" / "parts" / "00000.parquet").exists()
    rem = pd.read_parquet(out / "removal_list.parquet")
    assert "matched_key" in rem and set(rem["shard"]) <= {"00000", "00001", "00002"}
    assert sorted(p.name for p in (out / "scores").iterdir()) == [f"0000{i}.parquet" for i in range(3)]


def check_demo(demo: Path, out: Path, proc) -> None:
    check_scan(demo / "scan")
    truth = pd.read_parquet(demo / "corpus" / "truth.parquet")
    assert {"key", "group_id", "planted", "copies"} <= set(truth.columns)
    metrics = json.loads((demo / "scan" / "metrics.json").read_text())
    assert 0 <= metrics["scores"]["repeated_vs_unique"]["score_norm_cal"]["auroc"] <= 1
    assert 0 <= metrics["scores"]["repeated_vs_unique"]["loss_cal"]["auroc"] <= 1
    scores = pd.read_parquet(demo / "scan" / "scores")
    assert scores.loc[scores["error"].isna(), "loss_cal"].notna().all()  # the README sorts by it
    reps = pd.read_parquet(demo / "scan" / "replications.parquet")
    assert list(reps.columns[:5]) == ["gen_id", "caption", "seed", "matched_key", "similarity"] and len(reps) == 4
    # the detector's cut: a 1 % false-positive rate on the corpus' held-out shard (100 images with --quick)
    cal = json.loads((demo / "scan" / "summary.json").read_text())["thresholds"]["calibration"]
    assert cal["images"] == 100 and cal["fpr"] == 0.01 and cal["shards"] == ["00000"]
    thresholds = json.loads((demo / "scan" / "summary.json").read_text())["thresholds"]
    assert thresholds["detector"] == "loss_cal"
    # and at most 1 % of the corpus's ordinary members (median and MAD over the scored rows): the stricter applies
    m = cal["members"]
    assert m["rows"] == int(scores["loss_cal"].notna().sum()) and m["z"] == pytest.approx(2.3263, abs=1e-4)
    assert thresholds["threshold"] == pytest.approx(min(cal["heldout_cut"], m["cut"]))
    assert m["binding"] == (m["cut"] < cal["heldout_cut"])
    # near-misses below the cosine threshold are checked on the thumbnails the embed stage stored
    nb = json.loads((demo / "scan" / "summary.json").read_text())["neighbours"]
    assert nb["thresholds"]["aligned"]["align_size"] == 32
    # by the affine verifier (neighbours.verifier: affine, the default; link "verified")
    assert nb["thresholds"]["aligned"]["verifier"] == "affine"
    assert nb["aligned_candidates"]["checked"] >= nb["aligned_candidates"]["linked"] == nb["links"]["verified"]
    assert len(list((demo / "scan" / "thumbs").glob("*.npy"))) == len(list((demo / "scan" / "parts").glob("*.parquet")))
    assert "link <code>verified</code>" in (demo / "scan" / "report.html").read_text()


def check_demo_latent(out: Path) -> None:
    """`memscan demo --model latent`: an SD-layout model trained here, scanned text-conditionally."""
    check_scan(out / "scan", conditional=True)
    model = out / "model"
    for f in ("model_index.json", "vae/config.json", "unet/config.json", "text_encoder/config.json",
              "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json"):
        assert (model / f).is_file(), f
    assert json.loads((model / "train_info.json").read_text())["kind"] == "latent"
    truth = pd.read_parquet(out / "corpus" / "truth.parquet")
    assert set(truth["caption_kind"].dropna()) == {"verbatim", "varied"}
    metrics = json.loads((out / "scan" / "metrics.json").read_text())
    for comp in ("verbatim_vs_unique", "varied_vs_unique", "oversampled_vs_unique"):
        assert 0 <= metrics["scores"][comp]["cfg_norm"]["auroc"] <= 1, comp
    reps = pd.read_parquet(out / "scan" / "replications.parquet")
    assert len(reps) == 4 and reps["caption"].notna().all()  # generated from training captions
    assert metrics["replications_by_caption"]
    summary = json.loads((out / "scan" / "summary.json").read_text())
    assert summary["config"]["model"]["kind"] == "latent" and summary["thresholds"]["calibration"]["images"] == 100
    assert summary["thresholds"]["detector"] == "loss_cal"
    scores = pd.read_parquet(out / "scan" / "scores")
    assert scores.loc[scores["error"].isna(), "loss_cal"].notna().all()  # mirrors encoded from pixels, latent noises


def check_corpus(out: Path) -> None:
    truth = pd.read_parquet(out / "truth.parquet")
    assert {"key", "group_id", "planted", "copies"} <= set(truth.columns)
    assert len(list((out / "shards").glob("*.tar"))) >= 1


def check_train_demo(out: Path) -> None:
    for f in ("unet/config.json", "scheduler/scheduler_config.json", "train_info.json"):
        assert (out / "model" / f).is_file(), f
    assert any((out / "model" / "unet").glob("*.safetensors"))
    assert json.loads((out / "model" / "train_info.json").read_text())["steps"] == 3


def check_embedder(out: Path) -> None:
    assert (out / "open_clip_config.json").is_file() and any(out.glob("*.safetensors"))


def check_metrics(out: Path) -> None:
    m = json.loads((out / "metrics.json").read_text())
    for col in m["scores"]["repeated_vs_unique"].values():
        assert 0 <= col["auroc"] <= 1 and 0 <= col["tpr_at_1pct_fpr"] <= 1
        assert 0 <= col["auroc_ci"][0] <= col["auroc_ci"][1] <= 1 and col["ci_units"]["positive"] >= 1
    assert 0 <= m["duplicates"]["pair_precision"] <= 1 and 0 <= m["duplicates"]["pair_recall"] <= 1
    assert 0 <= m["duplicates"]["non_identical"]["pair_precision"] <= 1  # the scan's part files hold the hashes


def check_report(out: Path) -> None:
    html = (out / "report.html").read_text()
    assert "Most at-risk samples" in html and "data:image/png;base64," in html


# README command -> (what it writes to check, how to prepare): `out` is the --out the test passes
CASES = {
    "memscan demo --out runs/demo": "demo",
    "memscan demo --model latent --out runs/demo-latent": "demo-latent",
    "memscan build-demo-corpus --out runs/corpus": "corpus",
    "memscan train-demo --out runs/demo": "train-demo",
    "memscan train-embedder --shards runs/demo/corpus/shards --out runs/embedder": "embedder",
    "memscan scan --config demo --shards 'runs/demo/corpus/shards/{00000..00005}.tar' "
    "--set model.path=runs/demo/model --set classify.calibration_shards=runs/demo/corpus/heldout --out runs/rescan":
    "scan",
    "memscan evaluate --out runs/demo/scan --truth runs/demo/corpus/truth.parquet": "metrics",
    "memscan report --out runs/demo/scan --truth runs/demo/corpus/truth.parquet": "report",
    "memscan scan --config laion-sd15 --shards '/data/laion/{00000..00099}.tar' "
    "--set model.path=/models/stable-diffusion-v1-5 --set neighbours.clip_checkpoint=/models/open_clip/ViT-L-14/"
    "open_clip_model.safetensors --out /scans/sd15": "scan-sd",
    DEDUP: "dedup",
    DEDUP_S3: "dedup-s3",
    AGAINST: "against",
    REFERENCE: "reference",
    "RAY_ADDRESS=HEAD:6379 memscan scan --config laion-sd15 --shards 's3://my-bucket/laion/{00000..00099}.tar' "
    "--out s3://my-bucket/scans/sd15": "scan-sd",
    "ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/scan.py "
    "--config configs/laion-sd15.yaml --out /shared/scans/sd15": "scan-sd",
}


@pytest.mark.slow
@pytest.mark.parametrize("cmd", sorted(CASES))
def test_shown_command_runs_as_typed(cmd, demo, paths, request):
    kind, case = CASES[cmd], cmd
    if cmd.startswith("RAY_ADDRESS="):  # the driver on a node of the cluster (ON_SESSION_RAY gives the address)
        cmd = cmd.split(" ", 1)[1]
    if kind == "dedup-s3":  # the README's bucket, on the local S3 server
        paths = s3_paths(paths, demo, request.getfixturevalue("s3_server"))
    argv = sized(localize(cmd, paths), paths)
    if kind == "dedup-s3":
        url = argv[argv.index("--out") + 1]
        proc = run_ok(argv)
        assert f"results in {url.rstrip('/')}" in proc.stdout, proc.stdout[-2000:]
        local = fetch(url, Path(paths["runs/"]) / "s3-dedup")
        check_dedup(local)
        assert json.loads((local / "summary.json").read_text())["shards"]["listed"] == 3
        assert not Path(url).exists() and not Path(url.replace("s3://", "s3:/")).exists()  # nothing local
        # everything the local dedup's --out holds (parts and their completion markers, arrays, previews, summary,
        # report), with the same tables
        assert_same_out(str(request.getfixturevalue("local_dedup")), url)
        return
    if kind == "dedup":  # run once by the local_dedup fixture (the S3 case compares with it)
        return check_dedup(request.getfixturevalue("local_dedup"))
    address = request.getfixturevalue("ray_session").get_runtime_context().gcs_address if kind in ON_SESSION_RAY \
        else None
    if kind in ("against", "reference"):
        old = request.getfixturevalue("local_dedup")  # the finished scan the week-2 shards are scanned against
        out = Path(argv[argv.index("--out") + 1])
        run_ok(argv, ray_address=address)
        return check_against(out, old) if kind == "against" else check_reference(out)
    out = Path(argv[argv.index("--out") + 1])
    if kind in ("scan", "scan-sd", "dedup", "embedder", "corpus"):  # commands that share an --out get one each
        out = out.parent / f"{out.name}-{sorted(CASES).index(case)}"
        argv[argv.index("--out") + 1] = str(out)
    if kind == "demo-latent":  # its own corpus and model: the quick sizes (SIZES["demo"]) from scratch
        out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "demo":  # the module fixture ran it; check everything it wrote
        return check_demo(demo, out, None)
    if kind == "train-demo":  # its own --out, with the quick corpus (train-demo builds the full one if missing)
        out = out.parent / "train-demo"
        argv[argv.index("--out") + 1] = str(out)
        shutil.copytree(demo / "corpus", out / "corpus")
    if "{00000..00005}" in cmd:  # the quick corpus has 3 shards, the full demo 6
        argv = [a.replace("{00000..00005}", "{00000..00002}") for a in argv]
    if kind in ("metrics", "report"):  # rewrite into a copy, so the order of the tests does not matter
        copy = out.parent / f"{out.name}-{kind}"
        shutil.copytree(out, copy, dirs_exist_ok=True)
        argv[argv.index("--out") + 1] = str(copy)
        (copy / "metrics.json").unlink(missing_ok=True)
        (copy / "report.html").unlink(missing_ok=True)
        out = copy
    run_ok(argv, ray_address=address)
    {"corpus": check_corpus, "train-demo": check_train_demo, "embedder": check_embedder, "scan": check_scan,
     "metrics": check_metrics, "report": check_report, "dedup": check_dedup, "demo-latent": check_demo_latent,
     "scan-sd": lambda o: check_scan(o, conditional=True)}[kind](out)
    if "calibration_shards" in cmd:  # the cut came from the quick corpus' 100 held-out images
        assert json.loads((out / "summary.json").read_text())["thresholds"]["calibration"]["images"] == 100


@pytest.mark.slow
def test_readme_pandas_and_duckdb_snippets(demo):
    """The README's Python and SQL blocks, run as shown against the quick demo's scan."""
    text = README.read_text()
    python = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1).replace("runs/demo", str(demo))
    proc = run(["python", "-c", python + "\nprint('rows', len(scores))\n"])
    assert proc.returncode == 0 and "rows" in proc.stdout, proc.stdout[-3000:]
    import duckdb  # the test extra installs it; the README's SQL is what users paste into duckdb

    sql = re.search(r"```sql\n(.*?)```", text, re.DOTALL).group(1).replace("runs/demo", str(demo))
    sql = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    queries = [q.strip() for q in sql.split(";") if q.strip()]
    assert len(queries) == 2
    removal = duckdb.sql(queries[0]).fetchall()
    assert sum(n for _, n in removal) == len(pd.read_parquet(demo / "scan" / "removal_list.parquet"))
    classes = duckdb.sql(queries[1]).fetchall()
    assert sum(row[1] for row in classes) == pq.read_table(demo / "scan" / "scores").num_rows
