"""A real `k2 serve` process on 127.0.0.1 for the tests: started on a free port, its URL read from the line it prints
when ready, stopped with Ctrl-C (SIGINT) as a user stops it."""
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120
SETTLE_TIMEOUT_S = 30


class ServerProcess:
    """`k2 serve ARGS --port 0` (through `launcher`, a script that runs the k2 CLI, if given); `url` is its base URL
    (http://127.0.0.1:PORT) and `log` what it wrote on stderr so far."""

    def __init__(self, *args: str, launcher: Path | None = None, env: dict | None = None):
        command = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "k2cli"]
        self.proc = subprocess.Popen([*command, "serve", *args, "--port", "0"], cwd=ROOT, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env={**os.environ, "K2_DEBUG": "1", **(env or {})})
        self.lines: list[str] = []
        self.url = self._wait_ready()
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for line in self.proc.stderr:
            self.lines.append(line)
            if line.startswith("k2 serve:") and " on http://" in line:
                return line.split(" on ", 1)[1].split()[0].removesuffix("/v1")
            if time.monotonic() > deadline:
                break
        self.proc.kill()
        raise RuntimeError("k2 serve did not start:\n" + "".join(self.lines))

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        """Its stderr so far; all of it once the process has exited (the thread reading it is waited for)."""
        if self.proc.poll() is not None:
            self.reader.join(10)
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        """Ctrl-C, and the exit status once it has drained."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def metric_families(self) -> list:
        """GET /metrics, read by Prometheus' own client library's parser (which refuses text not in its format)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            return list(text_string_to_metric_families(response.read().decode()))

    def metrics(self) -> dict[str, float]:
        """/metrics, each sample's value by its name."""
        return {sample.name: sample.value for family in self.metric_families() for sample in family.samples}

    def settled_metrics(self) -> dict[str, float]:
        """/metrics once no request runs or waits (those whose clients left have stopped)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while (metrics := self.metrics())["k2_running_requests"] or metrics["k2_queue_depth"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"requests still run after {SETTLE_TIMEOUT_S} s: {metrics}")
            time.sleep(0.02)
        return metrics
