"""docs/bare-metal.md, run on loopback: three "machines" (a folder each), the guide's own files
and commands, the daemons started with the systemd units' ExecStart, Environment and
WorkingDirectory.

What is rewritten, and only that: host names and ports (every machine is 127.0.0.1, so each
gets its own ports), the root of absolute paths (`/etc/...` becomes `MACHINE/etc/...`), the
installed `/opt/pf2lora/bin/pf2lora` becomes this interpreter, and `sudo -u USER` is dropped.
The steps that need root (useradd, install -o, systemctl) are done by the test itself: copying
the certificates where the guide installs them and creating the state directories systemd
creates. `systemd-analyze verify` checks the unit files where it is installed.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.federation import free_port
from tests.helpers.tiny import write_silo_data

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "bare-metal.md"
UNITS = ROOT / "deploy" / "systemd"
PF2LORA = "/opt/pf2lora/bin/pf2lora"
PY = [sys.executable, "-m", "pf2lora.cli.main"]
SILOS = ("hospital-a", "hospital-b")


def blocks(text: str) -> list[str]:
    return re.findall(r"^```\w*\n(.*?)^```", text, flags=re.M | re.S)


def guide_files(text: str) -> dict[str, str]:
    """Code blocks whose first line is `# /absolute/path`: the files the guide has you write."""
    out = {}
    for b in blocks(text):
        first = b.splitlines()[0]
        if re.fullmatch(r"# /[\w./-]+", first):
            out[first[2:]] = b
    return out


def guide_commands(text: str) -> list[str]:
    return [
        line.strip()
        for b in blocks(text)
        for line in b.splitlines()
        if PF2LORA in line and not line.startswith("#")
    ]


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's [Service] keys (repeated keys in order)."""
    out: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


class Machine:
    def __init__(self, root: Path, ports: dict[str, int]) -> None:
        self.root = root
        self.ports = ports  # the guide's port -> this machine's

    def text(self, s: str) -> str:
        """The guide's text as it reads on this machine."""
        s = s.replace("coordinator.example.org:8443", f"localhost:{self.ports[8443]}")
        s = s.replace("coordinator.example.org:8444", f"localhost:{self.ports[8444]}")
        s = s.replace("--server-name coordinator.example.org", "--server-name localhost")
        for port in (8443, 8444, 8081, 9100):
            s = re.sub(rf"(0\.0\.0\.0|127\.0\.0\.1):{port}\b", f"127.0.0.1:{self.ports[port]}", s)
        return re.sub(r"(?<![\w./-])/(etc|var|srv|root)/", lambda m: f"{self.root}/{m[1]}/", s)

    def argv(self, command: str) -> list[str]:
        words = shlex.split(self.text(command))
        if words[:2] == ["sudo", "-u"]:
            words = words[3:]
        assert words[0] == PF2LORA, command
        return PY + words[1:]

    def service(self, name: str, log: Path) -> subprocess.Popen[bytes]:
        """Start a unit the way systemd would: its ExecStart, Environment, WorkingDirectory,
        with the state, cache and configuration directories it declares."""
        u = unit(name)
        for key, base in (("StateDirectory", "var/lib"), ("CacheDirectory", "var/cache")):
            for d in u.get(key, []):
                (self.root / base / d).mkdir(parents=True, exist_ok=True, mode=0o700)
        env = {**os.environ}
        for line in u.get("Environment", []):
            for pair in shlex.split(self.text(line)):
                k, _, v = pair.partition("=")
                env[k] = v
        cwd = self.text(u["WorkingDirectory"][0])
        (exec_start,) = u["ExecStart"]
        with log.open("ab") as fh:
            return subprocess.Popen(
                self.argv(exec_start), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
            )


def run(m: Machine, command: str, timeout: float = 600) -> str:
    p = subprocess.run(m.argv(command), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{command}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_the_guide_shows_what_the_test_runs() -> None:
    text = GUIDE.read_text()
    files = guide_files(text)
    assert set(files) == {
        "/etc/pf2lora/coordinator.toml",
        "/etc/pf2lora-silo/silo.toml",
        "/root/first-run.toml",
    }
    commands = guide_commands(text)
    words = [c.split()[c.split().index(PF2LORA) :] for c in commands]
    assert [w[1:3] for w in words] == [
        ["certs", "init"],
        ["certs", "show"],
        ["silos", "--coordinator"],
        ["run", "start"],
        ["run", "report"],
        ["silo", "export"],
    ]
    for name in ("pf2lora-coordinator.service", "pf2lora-silo.service"):
        u = unit(name)
        assert u["ProtectSystem"] == ["strict"] and u["NoNewPrivileges"] == ["yes"]
        assert u["User"][0].startswith("pf2lora") and u["Restart"] == ["on-failure"]
        assert u["ExecStart"][0].startswith(PF2LORA + " ")
        # the config the unit reads is the one the guide writes
        assert shlex.split(u["ExecStart"][0])[-1] in files


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not here")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    for name in ("pf2lora-coordinator.service", "pf2lora-silo.service"):
        # the installed binary is the only thing missing on a build machine
        text = (UNITS / name).read_text().replace(PF2LORA, shutil.which("true") or "/bin/true")
        (tmp_path / name).write_text(text)
    p = subprocess.run(
        ["systemd-analyze", "verify", *map(str, sorted(tmp_path.glob("*.service")))],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr


def test_three_machine_walkthrough_on_loopback(tmp_path: Path) -> None:
    text = GUIDE.read_text()
    files, commands = guide_files(text), guide_commands(text)
    coordinator_ports = {8443: free_port(), 8444: free_port(), 8081: free_port(), 9100: free_port()}

    def machine(name: str) -> Machine:
        own = {8081: free_port(), 9100: free_port()}
        return Machine(tmp_path / name, {**coordinator_ports, **own})

    coord = machine("coordinator")
    silos = {s: machine(s) for s in SILOS}
    certs_init, certs_show, list_silos, run_start, run_report, export = commands
    # 2. certificates, then the files where the guide installs them
    run(coord, certs_init)
    assert "hospital-a" in run(coord, certs_show)
    pki = coord.root / "root" / "pki"
    shutil.copytree(pki / "coordinator", coord.root / "etc" / "pf2lora" / "tls")
    for s, m in silos.items():
        shutil.copytree(pki / "silos" / s, m.root / "etc" / "pf2lora-silo" / "tls")
    # 3. the coordinator
    for path in ("/etc/pf2lora/coordinator.toml", "/root/first-run.toml"):
        (coord.root / path[1:]).write_text(coord.text(files[path]))
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = {"coordinator": coord.service("pf2lora-coordinator.service", logs / "coord.log")}
    codes: dict[str, int] = {}
    try:
        # 4. each silo: its data and its silo.toml (silo B: the same with its id)
        for k, (s, m) in enumerate(silos.items()):
            data = m.root / "srv" / "pf2lora-silo" / "data"
            train, test = write_silo_data(data, k, 48, 24)
            test.rename(data / "eval.jsonl")
            conf = m.text(files["/etc/pf2lora-silo/silo.toml"]).replace("hospital-a", s)
            (m.root / "etc" / "pf2lora-silo" / "silo.toml").write_text(conf)
            procs[s] = m.service("pf2lora-silo.service", logs / f"{s}.log")
        # 5. the first run, from the admin's seat on the coordinator machine
        end = time.monotonic() + 240
        while True:  # the guide's `pf2lora silos` until both are allowed and joined
            listing = subprocess.run(coord.argv(list_silos), capture_output=True, text=True)
            if listing.returncode == 0 and listing.stdout.count(" yes ") == len(SILOS) * 2:
                break
            for name, p in procs.items():
                assert p.poll() is None, (logs / f"{name}.log").read_text()[-3000:]
            assert time.monotonic() < end, "silos did not join"
            time.sleep(1)
        out = run(coord, run_start)
        assert "hospital-a" in out and "hospital-b" in out and "personalised" in out
        run(coord, run_report)
        report = coord.root / "root" / "first-run-report"
        assert (report / "report.md").is_file() and len(list(report.glob("*.png"))) == 4
        assert "| hospital-b |" in (report / "report.md").read_text()
        # each institution exports its personalised model on its own machine
        for m in silos.values():
            run(m, export)
            out_dir = m.root / "var" / "lib" / "pf2lora-silo" / "export"
            assert (out_dir / "private" / "adapter_model.safetensors").is_file()
        # the state lives where the units put it, relative paths nowhere else
        assert (coord.root / "var" / "lib" / "pf2lora" / "state.db").is_file()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # systemctl stop
        for name, p in procs.items():
            try:
                code = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                code = -9
            codes[name] = code
    assert codes == dict.fromkeys(procs, 0), "every daemon stops cleanly on SIGTERM"
