"""deploy.imagekit: content hash, tags, build context and the build-output reader, no engine."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from deploy.errors import DeployError
from deploy.imagekit import (
    BUILD_DEFAULTS,
    KIT,
    BuildPlan,
    ContextFile,
    ImageError,
    content_hash,
    context_tar,
    follow_build,
    image_tags,
    project_version,
    role_context,
    runtime_dists,
)

FILES = (ContextFile("Dockerfile", b"FROM x\n"), ContextFile("kit/bin/run", b"#!/bin/sh\n", 0o755))


def test_content_hash_is_stable_and_ignores_file_order() -> None:
    digest = content_hash(FILES, "0.1.0", "sha256:b")
    assert digest == content_hash(FILES[::-1], "0.1.0", "sha256:b")
    assert len(digest) == 12


@pytest.mark.parametrize(
    "change",
    [
        lambda f, v, b: ((ContextFile("Dockerfile", b"FROM y\n"), f[1]), v, b),
        lambda f, v, b: ((f[0], ContextFile("kit/bin/run", b"#!/bin/sh\n", 0o644)), v, b),
        lambda f, v, b: ((ContextFile("Dockerfile2", b"FROM x\n"), f[1]), v, b),
        lambda f, v, b: (f, "0.2.0", b),
        lambda f, v, b: (f, v, "sha256:other-base"),
    ],
)
def test_content_hash_changes_with_any_input(change) -> None:
    before = content_hash(FILES, "0.1.0", "sha256:b")
    assert content_hash(*change(FILES, "0.1.0", "sha256:b")) != before


def test_tags_are_version_hash_and_latest() -> None:
    assert image_tags("0.1.0", "0123456789ab") == ("0.1.0", "hash-0123456789ab", "latest")


def test_plan_carries_names_buildargs_and_labels() -> None:
    plan = BuildPlan("slave", "my-slave", "0.1.0", "scheduler-base:bookworm", "sha256:b", FILES)
    assert plan.tags == ("0.1.0", f"hash-{plan.content_hash}", "latest")
    assert plan.buildargs == {"BASE_IMAGE": "scheduler-base:bookworm", "VERSION": "0.1.0",
                              **BUILD_DEFAULTS}  # fmt: skip
    assert plan.labels["org.scheduler-kit.content-hash"] == plan.content_hash


def test_context_tar_is_byte_for_byte_reproducible_and_keeps_modes() -> None:
    data = context_tar(FILES)
    assert data == context_tar(FILES[::-1])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert members["kit/bin/run"].mode == 0o755 and members["kit/bin/run"].mtime == 0
        assert tar.extractfile("Dockerfile").read() == b"FROM x\n"  # type: ignore[union-attr]


def test_role_context_holds_dockerfile_kit_scheduler_and_cloudpickle() -> None:
    files = {f.path: f for f in role_context("master", "9.9.9")}
    assert files["Dockerfile"].data.startswith(b"#")
    assert files["kit/install.sh"].mode == 0o755
    assert "kit/bin/healthcheck" in files and "kit/site/scheduler/cli.py" in files
    assert "kit/site/cloudpickle/__init__.py" in files
    assert "kit/site/prometheus_client/__init__.py" in files
    assert b"Version: 9.9.9" in files["kit/site/scheduler_kit-9.9.9.dist-info/METADATA"].data
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in files if p.startswith("kit/site/deploy")]  # the images run no deploy


def test_role_context_names_a_missing_input(tmp_path: Path) -> None:
    (tmp_path / "master").mkdir(parents=True)
    (tmp_path / "master" / "Dockerfile").write_text("FROM x\n")
    with pytest.raises(ImageError, match="common.*is missing"):
        role_context("master", "0.1.0", tmp_path)


def test_the_images_carry_the_dependencies_pyproject_lists() -> None:
    import tomllib

    listed = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_")
             for d in listed["project"]["dependencies"]}  # fmt: skip
    assert set(runtime_dists()) == names


def test_the_defaults_baked_into_the_images_are_the_schedulers() -> None:
    """One truth per fact: the port and the drain grace come from scheduler.settings."""
    from scheduler.settings import DEFAULT_GRACE_SECONDS, DEFAULT_PORT

    assert BUILD_DEFAULTS["SCHEDULER_PORT"] == str(DEFAULT_PORT)
    assert int(BUILD_DEFAULTS["STOP_TIMEOUT"]) > DEFAULT_GRACE_SECONDS
    for role in ("master", "slave"):
        text = (KIT / role / "Dockerfile").read_text()
        assert "8888" not in text.replace("ARG SCHEDULER_PORT=8888", "")
        assert "LEASE" not in text and "GRACE_SECONDS=" not in text


def test_version_comes_from_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "3.2.1"\n')
    assert project_version(tmp_path) == "3.2.1"


def test_follow_build_echoes_output_and_returns_the_image_id() -> None:
    out = io.StringIO()
    chunks = [
        {"stream": "Step 1/2 : FROM x\n"},
        {"stream": " ---> abc\n"},
        {"aux": {"ID": "sha256:feed"}},
        {"stream": "Successfully built feed\n"},
    ]
    assert follow_build(chunks, "scheduler-master", out) == "sha256:feed"
    assert "Step 1/2 : FROM x" in out.getvalue()


def test_follow_build_falls_back_to_the_success_line() -> None:
    chunks = [{"stream": "Successfully built 0123abcd\n"}]
    assert follow_build(chunks, "r", io.StringIO()) == "0123abcd"


def test_follow_build_error_names_the_failing_step() -> None:
    chunks = [
        {"stream": "Step 1/3 : FROM x\n"},
        {"stream": "Step 2/3 : RUN false\n"},
        {"error": "The command '/bin/sh -c false' returned a non-zero code: 1"},
    ]
    with pytest.raises(ImageError) as info:
        follow_build(chunks, "scheduler-slave", io.StringIO())
    assert isinstance(info.value, DeployError)
    message = str(info.value)
    assert message.startswith("image scheduler-slave: build failed at Step 2/3 : RUN false")
    assert "non-zero code: 1" in message


def test_follow_build_without_an_id_is_an_error() -> None:
    with pytest.raises(ImageError, match="no image id"):
        follow_build([{"stream": "Step 1/1 : FROM x\n"}], "r", io.StringIO())
