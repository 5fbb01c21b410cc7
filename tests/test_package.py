"""memscan as users install it: from its wheel, outside the source tree (issue #19).

test_wheel_installs_and_runs_outside_the_checkout builds the wheel from a copy of the checkout,
installs it into a fresh virtual environment and runs memscan from a directory that holds no source.
The fresh environment gets this interpreter's already-installed dependencies through a .pth file
naming its site-packages: a directory added by a .pth line is not itself a site dir, so the .pth files
in it (an editable memscan's finder among them) are not run, and the only scanner importable is the
wheel's. Nothing is downloaded; it takes ~10 s. `pytest -m package` runs it alone.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import scanner

ROOT = Path(__file__).resolve().parent.parent
# run by the fresh venv's python: where scanner comes from, and the shipped configs found by name
WHICH_CONFIGS = ("import scanner, scanner.config as c; print(scanner.__file__); "
                 "print(c.resolve_config('demo')); print(c.load_config('laion-sd15').model.kind)")
# runs a jobs/scan.py (argv[1]) with --help, then says which scanner it imported
WHICH_JOB = ("import runpy, sys; sys.argv = [sys.argv[1], '--help']\n"
             "try: runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit: pass\n"
             "import scanner; print(scanner.__file__, file=sys.stderr)")


def test_version_is_written_once_and_reported(capsys):
    from scanner.cli import main
    from scanner.pipeline import versions

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"memscan {scanner.__version__}"
    assert versions()["memscan"] == scanner.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = {attr = "scanner.__version__"}' in pyproject


def test_configs_dir_is_the_package_data():
    """configs/ is what users read and copy, scanner/configs what the wheel ships: one set of files."""
    assert (ROOT / "configs").resolve() == (ROOT / "scanner" / "configs").resolve()
    assert {p.name for p in (ROOT / "scanner" / "configs").glob("*.yaml")} == {"demo.yaml", "demo-latent.yaml",
                                                                          "laion-sd15.yaml"}


def _copy_checkout(dst: Path) -> None:
    """The files a clean clone has (tracked, or new and not ignored), so no stale build/ of this tree leaks in."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but build and run outputs
        shutil.copytree(ROOT, dst, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "runs", "demo_out", "*.egg-info", "__pycache__", ".*cache", ".venv"))
        return
    for name in filter(None, listed):
        src, out = ROOT / name, dst / name
        if not os.path.lexists(src):  # deleted in the working tree, not yet committed
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), out)
        else:
            shutil.copy2(src, out)


def _run(args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


@pytest.mark.package
@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    src, dist, venv, elsewhere = (tmp_path / d for d in ("src", "dist", "venv", "elsewhere"))
    _copy_checkout(src)
    elsewhere.mkdir()

    # build: offline, with this environment's setuptools (the test extra pins the version pyproject needs)
    r = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
              "-w", dist, src], tmp_path, os.environ.copy())
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = dist.glob("memscan-*.whl")
    assert wheel.name == f"memscan-{scanner.__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"scanner/configs/demo.yaml", "scanner/configs/laion-sd15.yaml"} <= names
    assert f"memscan-{scanner.__version__}.dist-info/licenses/LICENSE" in names
    source_modules = {p.relative_to(src).as_posix() for p in (src / "scanner").rglob("*.py")}
    assert source_modules <= names, f"modules missing from the wheel: {sorted(source_modules - names)}"
    assert not any(n.startswith(("tests/", "benchmarks/", "jobs/")) for n in names)

    # a fresh venv; pip installs into it before the dependencies become visible, so it sees no other memscan
    r = _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, os.environ.copy())
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    r = _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel],
             tmp_path, os.environ.copy())
    assert r.returncode == 0, r.stdout + r.stderr
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                        os.environ.copy()).stdout.strip())
    deps = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "_memscan_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}  # no source on the path
    memscan = venv / "bin" / "memscan"

    r = _run([py, "-c", WHICH_CONFIGS], elsewhere, env)
    assert r.returncode == 0, r.stderr
    module, demo_yaml, kind = r.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(demo_yaml).is_relative_to(venv) and kind == "latent"

    r = _run([memscan, "--version"], elsewhere, env)
    assert r.returncode == 0 and r.stdout.strip() == f"memscan {scanner.__version__}", r.stdout + r.stderr
    r = _run([memscan, "--help"], elsewhere, env)
    assert r.returncode == 0 and "memscan demo --out runs/demo" in r.stdout, r.stderr
    r = _run([memscan, "demo", "--help"], elsewhere, env)
    assert r.returncode == 0 and all(f in r.stdout for f in ("--steps", "--seed", "--dose")), r.stderr

    # a real step: the demo's first one (its corpus), then the shipped config found by name through the CLI;
    # without --out the scan stops at its first check, after loading and validating the config, before Ray
    r = _run([memscan, "build-demo-corpus", "--out", "corpus", "--n-unique", "40"], elsewhere, env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (elsewhere / "corpus" / "truth.parquet").is_file() and list((elsewhere / "corpus" / "shards").glob("*.tar"))
    scan_args = ["--config", "demo", "--shards", "corpus/shards", "--set", "model.path=/nonexistent"]
    r = _run([memscan, "scan", *scan_args], elsewhere, env)
    assert r.returncode == 2 and "no output directory" in r.stderr, r.stdout + r.stderr
    r = _run([memscan, "scan", "--config", "nosuch", "--out", "x"], elsewhere, env)
    assert r.returncode == 2 and "shipped with memscan: demo, demo-latent, laion-sd15" in r.stderr, r.stdout + r.stderr

    # jobs/scan.py: beside a checkout it runs the checkout's scanner; alone it runs the installed one
    lone = elsewhere / "job" / "jobs" / "scan.py"
    lone.parent.mkdir(parents=True)
    shutil.copy2(src / "jobs" / "scan.py", lone)
    r = _run([py, lone, *scan_args], elsewhere, env)
    assert r.returncode == 2 and "no output directory" in r.stderr, r.stdout + r.stderr
    for job, home in ((lone, venv), (src / "jobs" / "scan.py", src)):
        r = _run([py, "-c", WHICH_JOB, job], elsewhere, env)
        assert Path(r.stderr.strip().splitlines()[-1]).is_relative_to(home), r.stdout + r.stderr
