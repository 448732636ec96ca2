"""``python -m bench.serve``: `flexattn-jax serve` under load on localhost (not a timed test).

Starts the server (``--warmup``) on the demo's model (``demo_out/model``, or ``--checkpoint``; with
``--smoke`` a randomly initialised model of the demo's configuration, built in a temporary
directory) and sends it the demo's questions about the demo's images as ``data:`` URLs:

1. **one at a time**: ``--sequential`` requests, each sent when the previous one is answered;
2. **concurrent**: ``--clients`` clients x ``--per-client`` requests, each client sending its next
   request when its previous one is answered: requests/s, latency p50/p99, the batch-size
   histogram (from ``/metrics``), the status codes;
3. **soak**: ``--soak`` requests from the same clients, the server's RSS read after each
   completion: its growth over the second half.

Everything is bounded: a request times out after ``--request-timeout`` s, the whole run after
``--time-limit`` s. Prints a table and writes JSON (``--out``); the goals are those of issue 23:
no lost request, no 5xx but deliberate 503s, requests/s at least 3x one at a time, RSS growth over
the last half below 5%.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

DEMO_MODEL = Path("demo_out") / "model"


class ServerProcess:
    """``flexattn-jax serve`` in a subprocess on a free localhost port (``--port 0``): started, ready (``/health``), stopped.

    Its stderr is collected in ``lines`` (a thread reads it, so the pipe never fills).
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready_timeout: float = 600.0):
        self.args, self.env, self.ready_timeout = args, env, ready_timeout
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        cmd = [sys.executable, "-m", "flexattn_jax.app.cli", "serve", "--host", "127.0.0.1", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not self.url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start (exit {self.proc.returncode}):\n" + "".join(self.lines[-30:]))
            time.sleep(0.05)
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not answer /health:\n" + "".join(self.lines[-30:]))
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self.url and line.startswith("serving ") and " on http://" in line:
                self.url = line.split(" on ", 1)[1].split()[0].removesuffix("/v1")

    def rss_bytes(self) -> int:
        """The server's resident set size (Linux ``/proc``)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc status")

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM, then the exit status (killed, and an error, after ``timeout`` s)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the server did not stop within {timeout} s of SIGTERM:\n" + "".join(self.lines[-30:])) from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(60)
            except RuntimeError:
                pass

    def __exit__(self, *exc) -> None:
        self.stop()


def smoke_checkpoint(directory: Path) -> Path:
    """A randomly initialised model of the demo's configuration, written as ``flexattn-jax demo`` writes its model."""
    import jax

    from flexattn_jax.app.demo import demo_model_config
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from flexattn_jax.checkpoint import write_model
    from flexattn_jax.params import init_params

    tokenizer = build_demo_tokenizer()
    cfg = demo_model_config(len(tokenizer))
    return write_model(jax.device_get(init_params(cfg, jax.random.key(0))), cfg, directory / "model",
                       {"source": "bench.serve --smoke", "source_layout": "demo"},
                       lambda d: [Path(f).name for f in tokenizer.save_pretrained(str(d))])


def demo_bodies(model: str, n_images: int, max_tokens: int, seed: int = 7) -> list[dict[str, Any]]:
    """Chat bodies of the demo's questions about ``n_images`` of its images (PNG data URLs)."""
    from flexattn_jax.app.demo_data import make_split

    bodies = []
    for img, question, _, _ in make_split(seed, n_images):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        bodies.append({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}]})
    return bodies


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one pre-encoded HTTP/1.1 request on a kept-alive connection; ``(status, server closes the connection)``."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close = 0, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    await reader.readexactly(length)
    return status, close


async def load(url: str, bodies: list[dict], clients: int, total: int, timeout: float,
               on_done=None) -> list[tuple[int | str, float]]:
    """``total`` requests from ``clients`` concurrent clients (each sends its next when answered): ``(status, seconds)``
    each, the status an exception's name when no HTTP answer came.

    Each client is one kept-alive HTTP/1.1 connection sending pre-encoded requests: a load generator
    far cheaper than a full client library, so that on a small machine the CPU goes to the server.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = []
    for b in bodies:
        payload = json.dumps(b).encode()
        requests.append(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    results: list[tuple[int | str, float]] = []
    counter = iter(range(total))

    async def worker() -> None:
        conn = None
        try:
            for i in counter:
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
                    status, close = await asyncio.wait_for(_exchange(*conn, requests[i % len(requests)]), timeout)
                    if close:
                        conn[1].close()
                        conn = None
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError) as e:
                    status = type(e).__name__
                    if conn is not None:
                        conn[1].close()
                        conn = None
                results.append((status, time.perf_counter() - t0))
                if on_done is not None:
                    on_done(len(results))
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def batch_histogram(url: str) -> Counter:
    """Batches run so far by size, from ``/metrics`` (``flexattn_batch_size`` is a histogram with one bucket per size)."""
    from prometheus_client.parser import text_string_to_metric_families

    cumulative = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name == "flexattn_batch_size":
            for s in family.samples:
                if s.name.endswith("_bucket") and s.labels["le"] != "+Inf":
                    cumulative[int(float(s.labels["le"]))] = int(s.value)
    out, below = Counter(), 0
    for size in sorted(cumulative):
        out[size] = cumulative[size] - below
        below = cumulative[size]
    return out


def summarize(results: list[tuple[int | str, float]], seconds: float) -> dict[str, Any]:
    lat = sorted(t for s, t in results if s == 200)
    codes = Counter(str(s) for s, _ in results)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None  # noqa: E731
    return {"requests": len(results), "ok": codes.get("200", 0), "seconds": seconds, "requests_per_s": len(results) / seconds,
            "latency_p50_s": statistics.median(lat) if lat else None, "latency_p99_s": q(0.99), "status": dict(codes),
            "errors": sum(n for c, n in codes.items() if c != "200"),
            "lost": sum(n for c, n in codes.items() if not c.isdigit()),  # no HTTP answer (a timeout, a dropped connection)
            "server_errors_not_503": sum(n for c, n in codes.items() if c.isdigit() and c.startswith("5") and c != "503")}


def run(checkpoint: Path, *, clients: int, per_client: int, sequential: int, soak: int, max_batch: int, max_new_tokens: int,
        request_timeout: float, time_limit: float, extra: list[str], n_images: int = 64, server_log: str | None = None) -> dict[str, Any]:
    """The three phases against a fresh server on ``checkpoint``; the figures and the goals."""
    t_start = time.perf_counter()
    model = "bench"
    bodies = demo_bodies(model, n_images, max_new_tokens)
    args = ["--checkpoint", str(checkpoint), "--model-name", model, "--max-batch", str(max_batch), "--max-new-tokens",
            str(max_new_tokens), "--max-prompt-tokens", "64", "--max-queue", str(max(256, 2 * clients)), "--warmup", *extra]
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "clients": clients, "per_client": per_client, "max_batch": max_batch,
                           "max_new_tokens": max_new_tokens, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}
    with ServerProcess(args) as server:
        out["startup_s"] = time.perf_counter() - t_start

        def timed(total: int, n_clients: int, on_done=None) -> dict[str, Any]:
            left = time_limit - (time.perf_counter() - t_start)
            if left <= 0:
                raise TimeoutError(f"--time-limit {time_limit} s reached")
            t0 = time.perf_counter()
            results = asyncio.run(asyncio.wait_for(load(server.url, bodies, n_clients, total, request_timeout, on_done), left))
            return summarize(results, time.perf_counter() - t0)

        out["sequential"] = timed(sequential, 1)
        before = batch_histogram(server.url)
        out["concurrent"] = timed(clients * per_client, clients)
        out["concurrent"]["batch_sizes"] = {str(k): v for k, v in sorted((batch_histogram(server.url) - before).items())}
        rss: dict[int, int] = {}
        marks = {soak // 2, soak}
        out["soak"] = timed(soak, clients, lambda n: rss.setdefault(n, server.rss_bytes()) if n in marks else None)
        out["soak"]["rss_mb_half"], out["soak"]["rss_mb_end"] = rss[soak // 2] / 2**20, rss[soak] / 2**20
        out["soak"]["rss_growth_second_half"] = (rss[soak] - rss[soak // 2]) / rss[soak // 2]
        out["exit_status"] = server.terminate()
        if server_log:
            Path(server_log).write_text("".join(server.lines))
    seq, con, sk = out["sequential"], out["concurrent"], out["soak"]
    out["speedup"] = con["requests_per_s"] / seq["requests_per_s"]
    lost = sum(p["lost"] for p in (seq, con, sk))
    bad_5xx = sum(p["server_errors_not_503"] for p in (seq, con, sk))
    out["goals"] = [
        {"goal": "lost requests (no HTTP answer) == 0", "value": lost, "met": lost == 0},
        {"goal": "5xx other than 503 == 0", "value": bad_5xx, "met": bad_5xx == 0},
        {"goal": "concurrent requests/s >= 3x one at a time", "value": out["speedup"], "met": out["speedup"] >= 3},
        {"goal": f"RSS growth over the last {soak - soak // 2} of {soak} requests < 5%", "value": sk["rss_growth_second_half"],
         "met": sk["rss_growth_second_half"] < 0.05},
        {"goal": "exit status 0 after SIGTERM", "value": out["exit_status"], "met": out["exit_status"] == 0},
    ]
    out["seconds"] = time.perf_counter() - t_start
    return out


def format_table(r: dict[str, Any]) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    rows = ["| phase | clients | requests | ok | errors | requests/s | p50 s | p99 s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, clients in (("one at a time", 1), ("concurrent", r["clients"]), ("soak", r["clients"])):
        p = r[{"one at a time": "sequential"}.get(name, name)]
        rows.append(f"| {name} | {clients} | {p['requests']} | {p['ok']} | {p['errors']} | {p['requests_per_s']:.2f} | "
                    f"{f(p['latency_p50_s'], '.3f')} | {f(p['latency_p99_s'], '.3f')} |")
    hist = ", ".join(f"{k}: {v}" for k, v in r["concurrent"]["batch_sizes"].items())
    rows += ["", f"batch sizes in the concurrent phase (size: batches): {hist}",
             f"soak RSS: {r['soak']['rss_mb_half']:.0f} MB after {r['soak']['requests'] // 2} requests, "
             f"{r['soak']['rss_mb_end']:.0f} MB after {r['soak']['requests']}",
             "", "| goal | value | met |", "|---|---:|---|"]
    rows += [f"| {g['goal']} | {g['value']:.3g} | {'yes' if g['met'] else '**no**'} |" for g in r["goals"]]
    return (f"flexattn-jax serve on {r['checkpoint']} (max batch {r['max_batch']}, max_new_tokens {r['max_new_tokens']}, "
            f"{r['cpu_count']} CPUs):\n\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help=f"the model to serve (default: {DEMO_MODEL}, from `flexattn-jax demo`)")
    p.add_argument("--smoke", action="store_true",
                   help="small counts (8 clients x 2, 4 one at a time, soak 32, 8 images) and, without --checkpoint, a random model "
                   "of the demo's configuration")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=8)
    p.add_argument("--sequential", type=int, default=64, help="requests sent one at a time (the baseline; default: 64)")
    p.add_argument("--soak", type=int, default=1000, help="requests of the RSS phase (default: 1000)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds for the whole run (default: 1800)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout, after the table on stderr)")
    p.add_argument("--server-log", default=None, help="write the server's stderr (one line per batch) here")
    p.add_argument("--server-arg", action="append", default=[], help="extra `flexattn-jax serve` argument (repeatable)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.per_client, args.sequential, args.soak = min(args.clients, 8), min(args.per_client, 2), 4, 32
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        elif args.smoke:
            ckpt = smoke_checkpoint(Path(tmp))
        elif DEMO_MODEL.is_dir():
            ckpt = DEMO_MODEL
        else:
            print(f"error: no {DEMO_MODEL}: run `flexattn-jax demo` first, or pass --checkpoint or --smoke", file=sys.stderr)
            return 2
        result = run(ckpt, clients=args.clients, per_client=args.per_client, sequential=args.sequential, soak=args.soak,
                     max_batch=args.max_batch, max_new_tokens=args.max_new_tokens, request_timeout=args.request_timeout,
                     time_limit=args.time_limit, extra=args.server_arg, n_images=8 if args.smoke else 64,
                     server_log=args.server_log)
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
