"""Start `python -m pipo_mlx.server` as a subprocess on a free port and talk to it over plain HTTP."""

import http.client
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(model, log: Path, *flags: str) -> dict:
    """The server's url, port, process and log file, once it listens."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipo_mlx.server", "--model", str(model), "--port", "0",
                                 *flags], stderr=err, stdout=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 60
    while not (m := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text())):
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.1)
    return {"url": f"http://127.0.0.1:{m.group(1)}", "port": int(m.group(1)), "proc": proc, "log": log}


def stop_server(server: dict) -> None:
    server["proc"].terminate()
    server["proc"].wait(timeout=10)


def request(server: dict, method: str, path: str, body=None, headers=None):
    """(status, headers, parsed JSON body or the raw bytes when it is not JSON)."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    base = {"Content-Type": "application/json"} if data is not None else {}
    conn.request(method, path, data, {**base, **(headers or {})})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    try:
        return resp.status, dict(resp.getheaders()), json.loads(raw)
    except ValueError:
        return resp.status, dict(resp.getheaders()), raw


def sse_events(raw: bytes) -> list:
    """(event name, data) of each server-sent event in a stream's body."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            out.append((fields.get("event"), json.loads(fields["data"])))
    return out
