"""Helpers for the federation tests: real coordinator and silo processes on loopback, tiny data, a
recording proxy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from pf2lora.common.algorithms.base import AlgorithmConfig
from pf2lora.common.learning.config import TrainConfig
from pf2lora.common.runspec import RunConfig, to_json
from pf2lora.common.transport import grpc_factory, pki_files
from pf2lora.v1 import control_pb2 as cpb
from pf2lora.v1 import control_pb2_grpc
from tests.helpers.tiny import MINI
from tests.helpers.tls import provision

PY = [sys.executable, "-m", "pf2lora.cli.main", "--log-level", "INFO"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config(**kw: Any) -> RunConfig:
    train = TrainConfig(local_steps=kw.pop("local_steps", 3), batch_size=8)
    base: dict[str, Any] = dict(
        algorithm=AlgorithmConfig(train=train),
        model=MINI,
        rounds=2,
        min_silos=2,
        round_deadline_s=120.0,
        enroll_window_s=60.0,
        eval_deadline_s=120.0,
        seed=7,
    )
    base.update(kw)
    return RunConfig(**base)


class Procs:
    """Processes this test started, by name; logs appended to DIR/NAME.log across restarts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        p = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
            env={**os.environ, **env} if env else None,
        )
        log.close()
        self.procs[name] = p
        return p

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def kill9(self, name: str) -> None:
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def stopped(self, name: str) -> bool:
        """True while the process is stopped (SIGSTOP): state T in /proc/PID/stat."""
        try:
            stat = Path(f"/proc/{self.procs[name].pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def tail(self, name: str, lines: int = 40) -> str:
        p = self.root / f"{name}.log"
        text = p.read_text(errors="replace").splitlines() if p.exists() else []
        return "\n".join(text[-lines:])

    def tails(self) -> str:
        return "\n".join(f"===== {n} =====\n{self.tail(n)}" for n in self.procs)

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


class Federation:
    """A coordinator process and silo processes on loopback.

    Plaintext (--insecure) by default, so that a test can read what a silo sent on the wire;
    `tls=True` runs mutual TLS. Either way a PKI is made for the test (ROOT/pki: CA, coordinator,
    one certificate per silo, admin "ops"): each silo signs its secure-aggregation keys with its
    certificate's key, which secure rounds (the default) need even over plaintext.
    """

    def __init__(
        self,
        root: Path,
        silos: dict[str, tuple[Path, Path]],
        *,
        federation: str = "pf2lora",
        silo_extra: dict[str, dict[str, Any]] | None = None,
        coordinator_args: list[str] | None = None,
        tls: bool = False,
    ) -> None:
        self.root = root
        self.tls = tls
        self.pki = root / "pki"
        if not (self.pki / "ca.crt").exists():
            provision(self.pki, federation, sorted(silos))
        self.silos = silos
        self.federation = federation
        self.procs = Procs(root)
        self.silo_port = free_port()
        self.control_port = free_port()
        self.state_dir = root / "coordinator"
        self.silo_extra = silo_extra or {}
        self.coordinator_args = coordinator_args or []  # extra flags of `coordinator serve`
        self._channel: grpc.Channel | None = None
        self.stub: control_pb2_grpc.ControlApiStub | None = None

    # ---------------------------------------------------------------- processes
    def _tls_files(self, role_dir: Path) -> list[str]:
        return [str(role_dir / name) for name in ("ca.crt", "tls.crt", "tls.key")]

    def start_coordinator(self) -> None:
        if self.tls:
            ca, cert, key = self._tls_files(pki_files.coordinator_dir(self.pki))
            transport = ["--ca-file", ca, "--cert-file", cert, "--key-file", key]
        else:
            transport = ["--insecure"]
        self.procs.start(
            "coordinator",
            PY
            + [
                "coordinator",
                "serve",
                *transport,
                "--federation",
                self.federation,
                "--state-dir",
                str(self.state_dir),
                "--allowed-silos",
                ",".join(sorted(self.silos)),
                "--silo-api-listen",
                f"127.0.0.1:{self.silo_port}",
                "--control-api-listen",
                f"127.0.0.1:{self.control_port}",
                "--health-listen",
                "",
                *self.coordinator_args,
            ],
        )
        if self._channel is None:
            if self.tls:
                creds = grpc_factory.channel_credentials(
                    *grpc_factory.TlsFiles.in_dir(pki_files.admin_dir(self.pki, "ops")).read()
                )
                self._channel = grpc_factory.create_channel(
                    f"127.0.0.1:{self.control_port}", creds, server_name_override="localhost"
                )
            else:
                self._channel = grpc.insecure_channel(f"127.0.0.1:{self.control_port}")
            self.stub = control_pb2_grpc.ControlApiStub(self._channel)

    def silo_config(self, silo_id: str) -> Path:
        train, test = self.silos[silo_id]
        extra = self.silo_extra.get(silo_id, {})
        address = extra.get("address", f"127.0.0.1:{self.silo_port}")
        lines = [
            "[silo]",
            f'id = "{silo_id}"',
            f'federation = "{self.federation}"',
            f'state_dir = "{self.root / silo_id}"',
            "threads = 1",
            "keep_rounds = 100",
            f"exit_after_run = {str(extra.get('exit_after_run', True)).lower()}",
        ]
        if "audit_log" in extra:
            lines.append(f'audit_log = "{extra["audit_log"]}"')
        if "report_metrics" in extra:
            lines.append(f"report_metrics = {str(extra['report_metrics']).lower()}")
        if "require_secure_aggregation" in extra:
            lines.append(
                f"require_secure_aggregation = {str(extra['require_secure_aggregation']).lower()}"
            )
        ca, cert, key = self._tls_files(pki_files.silo_dir(self.pki, silo_id))
        lines += [
            "[coordinator]",
            f'address = "{address}"',
            f"insecure = {str(not self.tls).lower()}",
            'server_name = "localhost"',
            "retry_initial_s = 0.2",
            "retry_max_s = 2.0",
            "long_poll_s = 2.0",
            "[tls]",
            f'ca_file = "{ca}"',
            f'cert_file = "{cert}"',
            f'key_file = "{key}"',
            "[model]",
            f'path = "{extra.get("model_path", "minilm")}"',
            "[data]",
            f'train_files = ["{train}"]',
            f'eval_files = ["{test}"]',
            "[server]",
            f'health_listen = "{extra.get("health_listen", "")}"',
            f'metrics_listen = "{extra.get("metrics_listen", "")}"',
        ]
        path = self.root / f"{silo_id}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_silo(
        self,
        silo_id: str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        processes: int = 1,
    ) -> subprocess.Popen[bytes]:
        """The silo daemon; with `processes` > 1, under torchrun (gloo on loopback)."""
        serve = ["silo", "serve", "--config", str(self.silo_config(silo_id)), *args]
        if processes == 1:
            return self.procs.start(silo_id, PY + serve, env)
        torchrun = [
            str(Path(sys.executable).parent / "torchrun"),
            "--standalone",
            f"--nproc-per-node={processes}",
            "--max-restarts=0",
            "-m",
            "pf2lora.cli.main",
            "--log-level",
            "INFO",
        ]
        return self.procs.start(silo_id, torchrun + serve, env)

    def start(self) -> None:
        self.start_coordinator()
        for s in self.silos:
            self.start_silo(s)

    def close(self) -> None:
        self.procs.stop_all()
        if self._channel is not None:
            self._channel.close()

    # ------------------------------------------------------------------ control
    def _call(self, fn: Callable[[], Any]) -> Any:
        assert self.stub is not None
        return fn()

    def wait_for_silos(self, timeout: float = 120.0) -> None:
        def joined() -> bool:
            reply = self.stub.ListSilos(cpb.ListSilosRequest(), timeout=5)  # type: ignore[union-attr]
            return sum(s.joined for s in reply.silos) == len(self.silos)

        self.wait(joined, timeout, "all silos joined")

    def start_run(self, cfg: RunConfig, run_id: str = "") -> str:
        req = cpb.StartRunRequest(run_config_json=to_json(cfg), run_id=run_id)
        status = self.stub.StartRun(req, timeout=120)  # type: ignore[union-attr]
        return str(status.run_id)

    def status(self, run_id: str = "") -> cpb.RunStatus:
        return self.stub.GetRunStatus(cpb.GetRunStatusRequest(run_id=run_id), timeout=5)  # type: ignore[union-attr]

    def wait(self, pred: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> None:
        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                if pred():
                    return
            except grpc.RpcError as exc:  # coordinator (re)starting
                last = exc
            time.sleep(poll)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for: {what} ({last})\n{self.procs.tails()}"
        )

    def wait_run_done(self, run_id: str, timeout: float = 300.0) -> cpb.RunStatus:
        self.wait(
            lambda: self.status(run_id).state != cpb.RUN_STATE_RUNNING,
            timeout,
            f"run {run_id} ends",
        )
        return self.status(run_id)


def pump(
    src: socket.socket, dst: socket.socket, on_data: Callable[[bytes], None] | None = None
) -> None:
    """Copy src to dst until either side closes, then shut both (one direction of a TCP relay)."""
    try:
        while data := src.recv(1 << 16):
            if on_data is not None:
                on_data(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RecordingProxy:
    """A TCP forwarder that keeps every byte the client sends (the silo's whole transmission)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        def keep(data: bytes) -> None:
            with self._lock:
                self.sent += data

        pump(src, dst, keep if record else None)

    def close(self) -> None:
        self._stopped = True
        self._sock.close()


def env_ok() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def secure_simulation(sim_cfg: Any, roster_size: int, clip: float = 4.0) -> Any:
    """`run_simulation` whose aggregation sees what secure aggregation reveals: each payload
    clipped and fixed-point encoded as a silo of a `roster_size`-silo round encodes it (F chosen
    for the roster, as the coordinator does), the codes summed exactly, the sum decoded. A secure
    federation that retrains bit for bit must match it to float32 rounding, over any number of
    rounds (the plain simulation differs by the fixed-point error, which training amplifies)."""
    import numpy as np
    import torch

    from pf2lora.common import simulation
    from pf2lora.common.secagg import fixedpoint
    from pf2lora.common.secagg.layout import flatten, unflatten

    frac_bits = fixedpoint.choose_frac_bits(roster_size, clip)
    plain_sum = simulation.sum_payloads

    def revealed_sum(payloads: Any) -> dict[str, torch.Tensor]:
        total: np.ndarray | None = None
        layout = None
        for p in payloads:
            vector, layout = flatten(p)
            codes, _ = fixedpoint.encode(vector, clip, frac_bits)
            part = codes.view(np.int32).astype(np.int64)
            total = part if total is None else total + part
        assert total is not None and layout is not None
        decoded = total.astype(np.float64) * 2.0**-frac_bits
        return {
            k: torch.from_numpy(v.astype(np.float32)) for k, v in unflatten(decoded, layout).items()
        }

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the silos
    simulation.sum_payloads = revealed_sum  # type: ignore[assignment]
    try:
        return simulation.run_simulation(sim_cfg)
    finally:
        simulation.sum_payloads = plain_sum
        torch.set_num_threads(threads)


def freeze_in_training(
    fed: Federation, run_id: str, rounds: tuple[int, ...], silos: list[str], ready: str
) -> int:
    """SIGSTOP `silos` while round r (the first of `rounds` where that works) is training and each
    of them is `ready` ("fetched": has its global state) without having reported; returns r."""
    for r in rounds:

        def in_round(r: int = r) -> bool:
            st = fed.status(run_id)
            mine = {p.silo_id: p.state for p in st.participants}
            return (
                st.current_round == r
                and st.phase == cpb.RUN_PHASE_TRAINING
                and all(mine.get(s) == ready for s in silos)
            )

        fed.wait(in_round, 180, f"{silos} {ready} in round {r}", poll=0.01)
        for s in silos:
            fed.procs.signal(s, signal.SIGSTOP)
        st = fed.status(run_id)
        mine = {p.silo_id: p.state for p in st.participants}
        if (
            st.current_round == r
            and st.phase == cpb.RUN_PHASE_TRAINING
            and all(mine.get(s) not in (None, "reported") for s in silos)
        ):
            return r
        for s in silos:  # lost the race (it reported already): try the next round
            fed.procs.signal(s, signal.SIGCONT)
    raise AssertionError(f"could not catch {silos} mid-round in rounds {rounds}")
