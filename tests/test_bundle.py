"""The lock (constraints.txt: every package's version but torch's) and the offline bundle built within it. `make
bundle` writes the bundle (here `python -m pipelines.bundle build`, in the environment running this test, which `make
bundle` would set up first), then `make setup BUNDLE=DIR` installs the project from it into a fresh virtual
environment with the network off, on "the machine's own" torch.

The machine is simulated: this box's python3 has no torch, so the fresh environment sees what a CUDA PyTorch image
holds (torch, everything it requires, numpy and pillow) through a `.pth` file naming a folder of symlinks into the
environment running this test (like a system's site-packages, after the environment's own). pip's configuration
files and variables are dropped and its index and every proxy point at a dead port: a download attempt fails.
Building the bundle downloads about 200 MB (from pip's cache when it is warm); the whole file takes a few minutes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from pipelines.bundle import LOCK, MANIFEST, canonical, check, locked_versions, project_requirements
from rlhf.config import PROJECT_ROOT
from rlhf.models import EMBEDDED
from rlhf.rundir import PACKAGES

DEAD = "http://127.0.0.1:9"  # the discard port: nothing answers
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"


def pinned() -> dict[str, str]:
    """constraints.txt as {name: version}."""
    return dict(line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#"))


def test_the_lock_pins_every_package_the_project_needs_but_torch():
    needed = set(locked_versions())
    assert set(pinned()) == needed, (
        f"{LOCK.name} lacks {sorted(needed - set(pinned()))} and pins "
        f"{sorted(set(pinned()) - needed)} the project does not need: run `make lock`"
    )
    assert "torch" not in pinned()  # the Makefile picks its CPU or CUDA build


def test_the_lock_is_within_the_projects_ranges_and_what_the_tests_run_on():
    for requirement in map(Requirement, project_requirements()):
        if requirement.name != "torch":
            assert pinned()[canonical(requirement.name)] in requirement.specifier, requirement
    # the versions a run's manifest records (rlhf.rundir.PACKAGES) are the lock's: what these tests passed with
    installed = {canonical(n): importlib.metadata.version(n) for n in PACKAGES if n != "torch"}
    assert installed == {n: pinned()[n] for n in installed}, (
        f"`make setup` installs {LOCK.name}; after an upgrade, the tests, then `make lock`"
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    subprocess.run([sys.executable, "-m", "pipelines.bundle", "build", str(out)], cwd=PROJECT_ROOT, check=True)
    return out


def wheel_name(file: str) -> str:
    return canonical(file.split("-")[0])


def image_packages() -> set[str]:
    """What a CUDA PyTorch image holds, as installed here: torch and what it requires, numpy and pillow (told apart
    from the bundle's own rule, which resolves a CUDA torch; a CPU torch requires no nvidia-*)."""
    names, todo = set(), ["torch", "numpy", "pillow"]
    while todo:
        name = canonical(todo.pop())
        if name not in names:
            names.add(name)
            needs = [Requirement(r) for r in importlib.metadata.requires(name) or []]
            todo += [r.name for r in needs if not r.marker or r.marker.evaluate({"extra": ""})]
    return names


def test_the_bundle_leaves_out_the_torch_stack_and_carries_the_model_and_setuptools(bundle):
    wheels = json.loads((bundle / MANIFEST).read_text())["wheels"]
    names = {wheel_name(f) for f in wheels}
    assert not names & (image_packages() - {"setuptools"}), names
    # the CUDA stack, which a CPU torch does not require
    assert not [n for n in names if n == "triton" or n.startswith(("nvidia-", "cuda-"))]
    assert {"transformers", "trl", "datasets", "vadersentiment", "gguf", "setuptools"} <= names
    for spec in EMBEDDED.values():
        model = next(f for f in wheels if wheel_name(f) == canonical(spec.package))
        assert wheels[model] == spec.wheel_sha256
    # every package of the lock it carries, at the lock's version
    versions = {wheel_name(f): Version(f.split("-")[1]) for f in wheels}
    assert {n: v for n, v in versions.items() if n in pinned()} == {
        n: Version(v) for n, v in pinned().items() if n in versions
    }


def machine_image(folder: Path) -> Path:
    """A folder of symlinks to every file of `image_packages()` as installed here."""
    folder.mkdir()
    for name in image_packages():
        dist = importlib.metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files} - {"..", "__pycache__"}:
            if not (folder / top).exists():
                (folder / top).symlink_to(dist.locate_file(top))
    return folder


def offline_env(cache: Path) -> dict[str, str]:
    # never the flags of a `make test` that runs this test, nor this machine's pip settings (its local mirrors)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_")
        and "proxy" not in k.lower()
        and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV")
    }
    return {
        **env,
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": f"{DEAD}/simple",
        "http_proxy": DEAD,
        "https_proxy": DEAD,
        "HTTP_PROXY": DEAD,
        "HTTPS_PROXY": DEAD,
        "PPO_VS_DPO_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
    }


def test_make_setup_installs_from_the_bundle_alone_on_the_machines_torch(bundle, tmp_path):
    python3 = shutil.which("python3")
    version = subprocess.run(
        [python3, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        pytest.skip(f"python3 is {version}, this environment's torch is for {sys.version_info[:2]}")
    venv = tmp_path / "venv"
    subprocess.run([python3, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    site = venv / "lib" / PYTHON / "site-packages"
    image = machine_image(tmp_path / "image")
    (site / "machine.pth").write_text(f"{image}\n")
    env = offline_env(tmp_path / "cache")
    done = subprocess.run(
        ["make", "--no-print-directory", "setup", f"BUNDLE={bundle}", f"VENV={venv}"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    probe = (
        "import pipelines, trl, datasets, vaderSentiment, gguf, transformers, torch; "
        "print(torch.__file__); print(trl.__file__); print(transformers.__file__)"
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert Path(where[0]).is_relative_to(image)  # the machine's own torch
    assert all(Path(w).is_relative_to(site) for w in where[1:])  # from the bundle
    assert not [p.name for p in site.iterdir() if p.name.startswith(("torch", "triton", "nvidia"))]
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "conversion.json").is_file()


def broken_copy(bundle: Path, folder: Path, how: str) -> Path:
    """The bundle as symlinks, with one thing wrong."""
    folder.mkdir()
    manifest = json.loads((bundle / MANIFEST).read_text())
    victim = next(f for f in manifest["wheels"] if wheel_name(f) == "trl")
    for f in bundle.iterdir():
        if not (how == "no manifest" and f.name == MANIFEST):
            (folder / f.name).symlink_to(f)
    if how == "a wheel missing":
        (folder / victim).unlink()
    elif how == "a wheel cut short":
        (folder / victim).unlink()
        (folder / victim).write_bytes((bundle / victim).read_bytes()[:1000])
    elif how == "another Python":
        (folder / MANIFEST).unlink()
        (folder / MANIFEST).write_text(json.dumps({**manifest, "python": "2.7"}))
    return folder


@pytest.mark.parametrize(
    "how, says",
    [
        ("a wheel missing", "trl-"),
        ("a wheel cut short", "trl-"),
        ("no manifest", MANIFEST),
        ("another Python", "Python 2.7"),
    ],
)
def test_a_broken_bundle_is_one_line_naming_what_is_wrong(bundle, tmp_path, capsys, how, says):
    with pytest.raises(SystemExit) as e:
        check(broken_copy(bundle, tmp_path / "broken", how))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and says in err, err
