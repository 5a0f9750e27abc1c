"""The documented `pf2lora ...` commands are real: every subcommand path exists and every flag is
one that subcommand's parser accepts and its `--help` lists. Commands are read from the fenced
code blocks of the operator-facing docs; nothing is executed."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from pf2lora.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = (
    "README.md",
    "docs/operations.md",
    "docs/certificates.md",
    "docs/federation.md",
    "deploy/README.md",
    "docs/benchmarks.md",
    "docs/instruction-tuning.md",
    "docs/bare-metal.md",
)
# Fewest commands each file must yield: guards against an extractor that silently finds nothing.
MIN_COMMANDS = {
    "docs/operations.md": 15,
    "docs/certificates.md": 4,
    "docs/federation.md": 8,
    "deploy/README.md": 3,
    "docs/benchmarks.md": 1,
    "docs/instruction-tuning.md": 3,
    "docs/bare-metal.md": 6,
}

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MENTION = re.compile(r"(?:^|[\s/|;&(])pf2lora(?:\s|$)")  # `pf2lora` as a command word
OPERATORS = {"|", "||", "&", "&&", ";", ";;", "(", ")"}
CONSOLE = {"console", "shell-session"}  # `$ ` marks commands; other lines are output
SHELL = {
    "",
    "sh",
    "bash",
    "shell",
    "zsh",
    *CONSOLE,
}  # blocks read for commands (not text, toml, ...)
NO_VALUE = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._StoreConstAction,
    argparse._CountAction,
    argparse._HelpAction,
    argparse._VersionAction,
    argparse._AppendConstAction,
    argparse.BooleanOptionalAction,
)


@dataclass(frozen=True)
class Command:
    where: str  # FILE:LINE
    argv: tuple[str, ...]  # starting after `pf2lora`

    def __str__(self) -> str:
        return f"{self.where}: `pf2lora {' '.join(self.argv)}`"


def fenced_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, block language, line) for every line inside a fenced shell or console block
    (also indented fences in list items)."""
    out: list[tuple[int, str, str]] = []
    fence: str | None = None
    lang = ""
    indent = 0
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence, lang, indent = m["fence"], m["lang"].lower(), len(m["indent"])
            continue
        if m and m["fence"].startswith(fence) and not m["lang"]:
            fence = None
            continue
        if lang in SHELL:
            out.append((n, lang, line[indent:] if line[:indent].isspace() else line.lstrip()))
    return out


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Command lines of the fenced blocks with `\\` continuations joined and console prompts
    removed.
    """
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for n, lang, line in fenced_lines(text):
        if pending is not None:
            start, head = pending
            line = head + " " + line.strip()
            n = start
            pending = None
        elif lang in CONSOLE:
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        if line.rstrip().endswith("\\"):
            pending = (n, line.rstrip()[:-1])
            continue
        out.append((n, line))
    return out


def _words(segment: list[str]) -> list[str]:
    """Drop leading VAR=value assignments and a `sudo -u USER` prefix."""
    i = 0
    while i < len(segment) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[i]):
        i += 1
    if segment[i : i + 2] == ["sudo", "-u"]:
        i += 3
    return segment[i:]


def extract(text: str, name: str) -> tuple[list[Command], list[str]]:
    """The pf2lora commands of a Markdown text, and lines that mention pf2lora but do not parse."""
    commands: list[Command] = []
    problems: list[str] = []
    for n, line in logical_lines(text):
        if not MENTION.search(line):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        try:
            tokens = list(lexer)
        except ValueError as exc:
            problems.append(f"{name}:{n}: cannot split `{line.strip()}`: {exc}")
            continue
        segment: list[str] = []
        for tok in [*tokens, ";"]:
            if tok not in OPERATORS:
                segment.append(tok)
                continue
            words = _words(segment)
            if words and Path(words[0]).name == "pf2lora":
                commands.append(Command(f"{name}:{n}", tuple(words[1:])))
            segment = []
    return commands, problems


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction | None:  # type: ignore[type-arg]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _placeholder(token: str) -> str:
    """`[--json]` -> `--json`, `[RUN_ID]` -> `RUN_ID`; `...` stays."""
    return token.strip("[]") if token not in ("[", "]") else ""


def check(cmd: Command, parser: argparse.ArgumentParser) -> list[str]:
    """What is wrong with one documented command (empty: nothing)."""
    problems: list[str] = []
    p, path = parser, ["pf2lora"]
    tokens = [t for t in (_placeholder(t) for t in cmd.argv) if t and t != "..."]
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.startswith("-") and tok != "-":
            flag = tok.split("=", 1)[0]
            action = p._option_string_actions.get(flag)
            if action is None:
                problems.append(f"{cmd}: `{' '.join(path)}` has no option {flag}")
                continue
            if action.help == argparse.SUPPRESS or flag not in p.format_help():
                problems.append(f"{cmd}: {flag} is not in `{' '.join(path)} --help`")
            if "=" in tok or isinstance(action, NO_VALUE):
                continue
            if action.nargs in (None, 1) or isinstance(action.nargs, int):
                i += 1 if action.nargs in (None, 1) else int(action.nargs)
            elif action.nargs in ("*", "+", "?"):
                while i < len(tokens) and not tokens[i].startswith("-"):
                    i += 1
                    if action.nargs == "?":
                        break
            continue
        sub = _subparsers(p)
        if sub is not None:
            if tok not in sub.choices:
                problems.append(
                    f"{cmd}: `{' '.join(path)}` has no subcommand {tok!r} (choices: "
                    f"{sorted(sub.choices)})"
                )
                return problems
            p = sub.choices[tok]
            path.append(tok)
            continue
        # a positional argument or its placeholder
    sub = _subparsers(p)
    if sub is not None and sub.required and "--help" not in tokens and "-h" not in tokens:
        problems.append(f"{cmd}: `{' '.join(path)}` needs a subcommand ({sorted(sub.choices)})")
    return problems


def check_text(text: str, name: str) -> tuple[list[Command], list[str]]:
    parser = build_parser()
    commands, problems = extract(text, name)
    for cmd in commands:
        problems += check(cmd, parser)
    return commands, problems


@pytest.mark.parametrize("doc", DOCS)
def test_documented_commands_exist_with_their_flags(doc: str) -> None:
    path = ROOT / doc
    commands, problems = check_text(path.read_text(), doc)
    assert not problems, "\n".join(problems)
    assert len(commands) >= MIN_COMMANDS.get(doc, 0), (
        f"only {len(commands)} commands found in {doc}"
    )


FIXTURE = """
Some prose with `pf2lora run start --not-checked` inline (only fenced blocks count).

```console
$ pf2lora run start --tls-dir pki/admins/ops --rounds 3 --made-up-flag 7
started run-1
$ pf2lora certs revoke --dir pki --silo silo-a
```

- a list item:

  ```sh
  kubectl get pods && pf2lora silo serve --config silo.toml \\
      --metrics-listen 0.0.0.0:9100 --gpu
  PF2LORA_LOG_LEVEL=DEBUG .venv/bin/pf2lora coordinator
  ```
"""


def test_the_checker_rejects_made_up_flags_and_subcommands() -> None:
    commands, problems = check_text(FIXTURE, "fixture.md")
    assert [c.argv[:2] for c in commands] == [
        ("run", "start"),
        ("certs", "revoke"),
        ("silo", "serve"),
        ("coordinator",),
    ]
    text = "\n".join(problems)
    assert "`pf2lora run start` has no option --made-up-flag" in text
    assert "no subcommand 'revoke'" in text
    assert "`pf2lora silo serve` has no option --gpu" in text  # continuation line, indented fence
    assert "`pf2lora coordinator` needs a subcommand" in text
    for real in ("--tls-dir", "--rounds", "--dir", "--config", "--metrics-listen"):
        assert f"option {real}" not in text
    assert "--not-checked" not in text
    assert len(problems) == 4, text


def test_placeholders_and_value_flags_are_understood() -> None:
    doc = (
        "```console\n$ pf2lora run status --tls-dir pki/admins/ops [RUN_ID] [--json] [--wait]\n"
        "$ pf2lora --log-level DEBUG silos --json\n```\n"
    )
    commands, problems = check_text(doc, "ok.md")
    assert len(commands) == 2 and not problems, problems
