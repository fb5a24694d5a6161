"""A real Ray head for tests: `ray start --head --include-dashboard=true` on free, non-default ports, with token auth,
in its own temp dir — and stopped by killing only its own processes (`ray stop` would end every Ray on the machine)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path

import psutil

PORT_FLAGS = ("--port", "--dashboard-port", "--ray-client-server-port", "--node-manager-port", "--object-manager-port",
              "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")


@dataclass
class RayHead:
    temp: Path
    token_file: Path
    dashboard: str
    gcs_port: int

    def env(self) -> dict[str, str]:
        """What a client of this head needs: token mode and where the token is."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file)}

    def processes(self) -> list[psutil.Process]:
        """This head's processes (their command lines name its temp dir or GCS port) and all their descendants."""
        marks = (str(self.temp), f":{self.gcs_port}")
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info["cmdline"] or ())
            if any(m in cmdline for m in marks) and proc.pid != os.getpid():
                found[proc.pid] = proc
                try:
                    found.update({c.pid: c for c in proc.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        return list(found.values())


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def start_head(num_cpus: int = 4, extra_env: dict[str, str] | None = None, tries: int = 3) -> RayHead:
    """Start the head; ports are picked free just before, so a race with another process is retried."""
    for attempt in range(tries):
        try:
            return _start_head(num_cpus, extra_env or {})
        except subprocess.CalledProcessError as exc:
            if attempt == tries - 1:
                raise RuntimeError(f"ray start failed: {exc.stderr[-2000:]}") from None


def _start_head(num_cpus: int, extra_env: dict[str, str]) -> RayHead:
    temp = Path(tempfile.mkdtemp(prefix="rmhead"))  # short: Ray's unix sockets live under it
    token_file = temp / "auth_token"
    token_file.write_text(secrets.token_hex(24))
    ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS))))
    worker_low = max(ports.values()) + 1  # a worker port range that overlaps none of the ports above
    if worker_low + 200 > 65535:
        worker_low = min(ports.values()) - 201
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               **extra_env)
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", f"--temp-dir={temp / 'ray'}",
               f"--object-store-memory={128 * 1024**2}", "--disable-usage-stats",
               f"--min-worker-port={worker_low}", f"--max-worker-port={worker_low + 200}",
               *(f"{flag}={port}" for flag, port in ports.items())]
    head = RayHead(temp, token_file, f"http://127.0.0.1:{ports['--dashboard-port']}", ports["--port"])
    try:
        subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=120)
    except subprocess.CalledProcessError:
        stop_head(head)  # whatever did start
        raise
    return head


def stop_head(head: RayHead, grace: float = 3.0) -> None:
    procs = head.processes()
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    shutil.rmtree(head.temp, ignore_errors=True)


def kill_driver(spec_path: Path, deadline: float) -> int:
    """SIGKILL the job driver (`rankmerge run <spec_path> ...`, and the shell around it); returns how many died."""
    while time.time() < deadline:
        victims = [p for p in psutil.process_iter(["cmdline"])
                   if str(spec_path) in " ".join(p.info["cmdline"] or ()) and "--executor" in (p.info["cmdline"] or ())]
        if victims:
            for proc in victims:
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass
            return len(victims)
        time.sleep(0.01)
    return 0
