"""``python -m bench.serve``: `flexattn-jax serve` under load on localhost, decode slots against wave batching (not a timed test).

The same requests go to two fresh servers on the same checkpoint, one per scheduler
(``--scheduler wave``, the dynamic batching of whole requests, and ``--scheduler slots``, the
engine's continuous batching), with the same rows (``--max-batch`` = ``--slots``):

1. **mixed**: ``--clients`` clients x ``--per-client`` streamed requests about the demo's images,
   half asking for ``--short`` tokens and half for ``--long`` (each client sends its next request
   when its previous one is answered): requests/s, tokens/s, time to first token (the first SSE
   event, which carries the first token) and end-to-end latency at p50/p99, slot occupancy (decoded
   tokens over rows x decode steps, from ``/metrics``), status codes;
2. (slots) **repeat image**: questions about new images, each asked twice one at a time: the second
   one's time to first token against the first's (the image feature cache);
3. (slots) **soak**: ``--soak`` short requests from the same clients, the server's RSS read after
   each completion: its growth over the second half.

The default checkpoint (and ``--smoke``'s) is a randomly initialised model of the demo's
configuration whose end-of-sequence logit is zero, so its answers run to ``max_tokens``:
``--checkpoint`` serves another. Everything is bounded: a request times out after
``--request-timeout`` s, the whole run after ``--time-limit`` s. Prints a table and writes JSON
(``--out``); the goals are those of issue 35.
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


def smoke_checkpoint(directory: Path, stop: bool = False) -> Path:
    """A randomly initialised model of the demo's configuration, written as ``flexattn-jax demo`` writes its model; unless
    ``stop``, its LM head's end-of-sequence column is zero (a logit of 0 against a vocabulary of random ones: the
    answers run to ``max_tokens``)."""
    import jax
    import numpy as np

    from flexattn_jax.app.demo import demo_model_config
    from flexattn_jax.app.demo_data import build_demo_tokenizer
    from flexattn_jax.checkpoint import write_model
    from flexattn_jax.params import init_params

    tokenizer = build_demo_tokenizer()
    cfg = demo_model_config(len(tokenizer))
    params = jax.device_get(init_params(cfg, jax.random.key(0)))
    if not stop:
        head = params["text"]["lm_head"]["kernel"] = np.array(params["text"]["lm_head"]["kernel"])
        head[:, cfg.eos_token_id] = 0
    return write_model(params, cfg, directory / "model", {"source": "bench.serve --smoke", "source_layout": "demo"},
                       lambda d: [Path(f).name for f in tokenizer.save_pretrained(str(d))])


def image_url(img) -> str:
    """A PIL image as a PNG data: URL."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def demo_bodies(model: str, n_images: int, max_tokens: list[int], seed: int = 7) -> list[dict[str, Any]]:
    """Streamed chat bodies (usage included) of the demo's questions about ``n_images`` of its images, the i-th asking for
    ``max_tokens[i % len(max_tokens)]`` tokens."""
    from flexattn_jax.app.demo_data import make_split

    return [{"model": model, "max_tokens": max_tokens[i % len(max_tokens)], "stream": True, "stream_options": {"include_usage": True},
             "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(img)}},
                                                       {"type": "text", "text": question}]}]}
            for i, (img, question, _, _) in enumerate(make_split(seed, n_images))]


class Result:
    """One request as the client saw it: the status (an exception's name when no HTTP answer came), seconds to the first
    body byte (a streamed answer's first event: its first token) and to the end, completion tokens (from the usage)."""

    def __init__(self, status: int | str, ttft: float, latency: float, tokens: int = 0):
        self.status, self.ttft, self.latency, self.tokens = status, ttft, latency, tokens


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, t0: float) -> tuple[Result, bool]:
    """Send one pre-encoded HTTP/1.1 request on a kept-alive connection and read the answer (plain or chunked: a stream);
    ``(result, server closes the connection)``."""
    writer.write(request)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length, close, chunked = 0, False, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value == b"close":
            close = True
        elif name == b"transfer-encoding" and value == b"chunked":
            chunked = True
    ttft = None
    if not chunked:
        body = await reader.readexactly(length)
        ttft = time.perf_counter() - t0
    else:
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            ttft = time.perf_counter() - t0 if ttft is None else ttft
            await reader.readexactly(2)
        await reader.readexactly(2)
        body = b"".join(parts)
    tokens = 0
    if status == 200:
        events = [e.removeprefix(b"data: ") for e in body.split(b"\n\n") if e.startswith(b"data: {")] if chunked else [body]
        usage = json.loads(events[-1]).get("usage") if events else None
        tokens = usage["completion_tokens"] if usage else 0
    return Result(status, ttft if ttft is not None else time.perf_counter() - t0, time.perf_counter() - t0, tokens), close


async def load(url: str, bodies: list[dict], clients: int, total: int, timeout: float, on_done=None) -> list[Result]:
    """``total`` requests from ``clients`` concurrent clients (each sends its next when answered), request ``i`` the body
    ``bodies[i % len(bodies)]``.

    Each client is one kept-alive HTTP/1.1 connection sending pre-encoded requests: a load generator
    far cheaper than a full client library, so that on a small machine the CPU goes to the server.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    requests = []
    for b in bodies:
        payload = json.dumps(b).encode()
        requests.append(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    results: list[Result] = []
    counter = iter(range(total))

    async def worker() -> None:
        conn = None
        try:
            for i in counter:
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
                    result, close = await asyncio.wait_for(_exchange(*conn, requests[i % len(requests)], t0), timeout)
                    if close:
                        conn[1].close()
                        conn = None
                except (OSError, ValueError, IndexError, asyncio.IncompleteReadError, TimeoutError) as e:
                    result = Result(type(e).__name__, time.perf_counter() - t0, time.perf_counter() - t0)
                    if conn is not None:
                        conn[1].close()
                        conn = None
                results.append(result)
                if on_done is not None:
                    on_done(len(results))
        finally:
            if conn is not None:
                conn[1].close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def scrape(url: str) -> dict[str, float]:
    """The server's ``/metrics`` samples by name (labels included)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


def quantile(values: list[float], p: float) -> float | None:
    v = sorted(values)
    return v[min(len(v) - 1, int(p * len(v)))] if v else None


def summarize(results: list[Result], seconds: float) -> dict[str, Any]:
    ok = [r for r in results if r.status == 200]
    codes = Counter(str(r.status) for r in results)
    tokens = sum(r.tokens for r in ok)
    return {"requests": len(results), "ok": len(ok), "seconds": seconds, "requests_per_s": len(results) / seconds,
            "tokens": tokens, "tokens_per_s": tokens / seconds,
            "ttft_p50_s": quantile([r.ttft for r in ok], 0.5), "ttft_p99_s": quantile([r.ttft for r in ok], 0.99),
            "latency_p50_s": quantile([r.latency for r in ok], 0.5), "latency_p99_s": quantile([r.latency for r in ok], 0.99),
            "status": dict(codes), "errors": sum(n for c, n in codes.items() if c != "200"),
            "lost": sum(n for c, n in codes.items() if not c.isdigit()),  # no HTTP answer (a timeout, a dropped connection)
            "server_errors_not_503": sum(n for c, n in codes.items() if c.isdigit() and c.startswith("5") and c != "503")}


def occupancy(before: dict[str, float], after: dict[str, float], rows: int) -> float | None:
    """Decoded tokens per row and decode step over a phase: 1 when every row of every step decodes a token that a
    request keeps (the first token of each request comes from its prefill, not a step)."""
    steps = after.get("flexattn_decode_steps_total", 0) - before.get("flexattn_decode_steps_total", 0)
    tokens = after["flexattn_completion_tokens_total"] - before.get("flexattn_completion_tokens_total", 0)
    answered = after.get('flexattn_requests_total{code="200"}', 0) - before.get('flexattn_requests_total{code="200"}', 0)
    return (tokens - answered) / (steps * rows) if steps else None


def run(checkpoint: Path, *, clients: int, per_client: int, soak: int, rows: int, short: int, long: int, repeat: int,
        request_timeout: float, time_limit: float, extra: list[str], n_images: int = 64,
        server_log: str | None = None) -> dict[str, Any]:
    """The phases against a fresh server per scheduler on ``checkpoint``; the figures and the goals."""
    from flexattn_jax.app.demo_data import make_split

    t_start = time.perf_counter()
    model = "bench"
    bodies = demo_bodies(model, n_images, [short, long])
    out: dict[str, Any] = {"checkpoint": str(checkpoint), "clients": clients, "per_client": per_client, "rows": rows,
                           "short": short, "long": long, "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()}

    def timed(server: ServerProcess, bodies: list[dict], total: int, n_clients: int, on_done=None) -> tuple[dict, list[Result]]:
        left = time_limit - (time.perf_counter() - t_start)
        if left <= 0:
            raise TimeoutError(f"--time-limit {time_limit} s reached")
        t0 = time.perf_counter()
        results = asyncio.run(asyncio.wait_for(load(server.url, bodies, n_clients, total, request_timeout, on_done), left))
        return summarize(results, time.perf_counter() - t0), results

    for scheduler in ("wave", "slots"):
        args = ["--checkpoint", str(checkpoint), "--model-name", model, "--scheduler", scheduler, "--max-batch", str(rows),
                "--slots", str(rows), "--max-new-tokens", str(long), "--max-prompt-tokens", "64",
                "--max-queue", str(max(256, 2 * clients)), "--warmup", *extra]
        t0 = time.perf_counter()
        with ServerProcess(args) as server:
            phase: dict[str, Any] = {"startup_s": time.perf_counter() - t0}
            before = scrape(server.url)
            phase["mixed"], _ = timed(server, bodies, clients * per_client, clients)
            phase["mixed"]["occupancy"] = occupancy(before, scrape(server.url), rows)
            if scheduler == "slots":
                firsts, seconds = [], []
                for img, question, _, _ in make_split(11, repeat):  # images the server has not seen
                    body = [{"model": model, "max_tokens": short, "stream": True, "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": image_url(img)}}, {"type": "text", "text": question}]}]}]
                    (a, b), _ = zip(*(timed(server, body, 1, 1) for _ in range(2)), strict=True)
                    firsts.append(a["ttft_p50_s"])
                    seconds.append(b["ttft_p50_s"])
                m = scrape(server.url)
                out["repeat"] = {"images": repeat, "ttft_first_p50_s": statistics.median(firsts),
                                 "ttft_second_p50_s": statistics.median(seconds),
                                 "ratio": statistics.median(b / a for a, b in zip(firsts, seconds, strict=True)),
                                 "cache_hits": m["flexattn_image_cache_hits_total"], "cache_misses": m["flexattn_image_cache_misses_total"]}
                rss: dict[int, int] = {}
                marks = {soak // 2, soak}
                short_bodies = [{**b, "max_tokens": short} for b in bodies]
                out["soak"], _ = timed(server, short_bodies, soak, clients,
                                       lambda n, rss=rss, marks=marks: rss.setdefault(n, server.rss_bytes()) if n in marks else None)
                out["soak"]["rss_mb_half"], out["soak"]["rss_mb_end"] = rss[soak // 2] / 2**20, rss[soak] / 2**20
                out["soak"]["rss_growth_second_half"] = (rss[soak] - rss[soak // 2]) / rss[soak // 2]
            phase["exit_status"] = server.terminate()
            if server_log:
                Path(f"{server_log}.{scheduler}").write_text("".join(server.lines))
        out[scheduler] = phase
    wave, slots, sk, rep = out["wave"]["mixed"], out["slots"]["mixed"], out["soak"], out["repeat"]
    out["ttft_ratio"] = slots["ttft_p50_s"] / wave["ttft_p50_s"]
    out["tokens_per_s_ratio"] = slots["tokens_per_s"] / wave["tokens_per_s"]
    lost = wave["lost"] + slots["lost"] + sk["lost"]
    bad_5xx = wave["server_errors_not_503"] + slots["server_errors_not_503"] + sk["server_errors_not_503"]
    exits = max(out["wave"]["exit_status"], out["slots"]["exit_status"])
    out["goals"] = [
        {"goal": "p50 time to first token, mixed lengths <= 0.3x wave batching's", "value": out["ttft_ratio"],
         "met": out["ttft_ratio"] <= 0.3},
        {"goal": "tokens/s, mixed lengths >= 1.5x wave batching's", "value": out["tokens_per_s_ratio"],
         "met": out["tokens_per_s_ratio"] >= 1.5},
        {"goal": "lost requests (no HTTP answer) == 0", "value": lost, "met": lost == 0},
        {"goal": "5xx other than 503 == 0", "value": bad_5xx, "met": bad_5xx == 0},
        {"goal": "second question on the same image: time to first token <= 0.5x the first", "value": rep["ratio"],
         "met": rep["ratio"] <= 0.5},
        {"goal": f"RSS growth over the last {soak - soak // 2} of {soak} requests < 5%", "value": sk["rss_growth_second_half"],
         "met": sk["rss_growth_second_half"] < 0.05},
        {"goal": "exit status 0 after SIGTERM", "value": exits, "met": exits == 0},
    ]
    out["seconds"] = time.perf_counter() - t_start
    return out


def format_table(r: dict[str, Any]) -> str:
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    rows = ["| scheduler | requests | ok | requests/s | tokens/s | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | occupancy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("wave", "wave batching"), ("slots", "decode slots")):
        p = r[name]["mixed"]
        rows.append(f"| {label} | {p['requests']} | {p['ok']} | {p['requests_per_s']:.2f} | {p['tokens_per_s']:.1f} | "
                    f"{f(p['ttft_p50_s'], '.3f')} | {f(p['ttft_p99_s'], '.3f')} | {f(p['latency_p50_s'], '.3f')} | "
                    f"{f(p['latency_p99_s'], '.3f')} | {f(p['occupancy'], '.2f')} |")
    rep, sk = r["repeat"], r["soak"]
    rows += ["", f"repeat image (decode slots): TTFT p50 {rep['ttft_first_p50_s']:.3f} s first, {rep['ttft_second_p50_s']:.3f} s "
             f"second ({rep['images']} images; cache hits {rep['cache_hits']:.0f}, misses {rep['cache_misses']:.0f})",
             f"soak (decode slots): {sk['requests']} requests, {sk['requests_per_s']:.1f}/s; RSS {sk['rss_mb_half']:.0f} MB after "
             f"{sk['requests'] // 2}, {sk['rss_mb_end']:.0f} MB after {sk['requests']}",
             "", "| goal | value | met |", "|---|---:|---|"]
    rows += [f"| {g['goal']} | {g['value']:.3g} | {'yes' if g['met'] else '**no**'} |" for g in r["goals"]]
    return (f"flexattn-jax serve on {r['checkpoint']}: {r['clients']} clients x {r['per_client']} requests, half {r['short']} "
            f"and half {r['long']} tokens, {r['rows']} rows, {r['cpu_count']} CPUs:\n\n" + "\n".join(rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None,
                   help="the model to serve (default: a random model of the demo's configuration that does not stop early)")
    p.add_argument("--smoke", action="store_true", help="small counts (8 clients x 2, soak 32, 2 repeat images, 8 images)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--soak", type=int, default=1000, help="requests of the RSS phase (default: 1000)")
    p.add_argument("--repeat", type=int, default=8, help="images asked about twice (default: 8)")
    p.add_argument("--rows", type=int, default=8, help="--max-batch of the wave scheduler and --slots of the engine (default: 8)")
    p.add_argument("--short", type=int, default=4, help="max_tokens of half the requests (default: 4)")
    p.add_argument("--long", type=int, default=64, help="max_tokens of the other half, and --max-new-tokens (default: 64)")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds for the whole run (default: 1800)")
    p.add_argument("--out", default=None, help="write the JSON here (default: stdout, after the table on stderr)")
    p.add_argument("--server-log", default=None, help="write each server's stderr to this path + '.wave' / '.slots'")
    p.add_argument("--server-arg", action="append", default=[], help="extra `flexattn-jax serve` argument (repeatable)")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients, args.per_client, args.soak, args.repeat = min(args.clients, 8), min(args.per_client, 2), 32, 2
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else smoke_checkpoint(Path(tmp))
        result = run(ckpt, clients=args.clients, per_client=args.per_client, soak=args.soak, rows=args.rows, short=args.short,
                     long=args.long, repeat=args.repeat, request_timeout=args.request_timeout, time_limit=args.time_limit,
                     extra=args.server_arg, n_images=8 if args.smoke else 64, server_log=args.server_log)
    print(format_table(result), file=sys.stderr)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
