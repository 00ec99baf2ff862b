"""Load benchmark of ``diffutron serve``: does batching concurrent requests pay off?

Starts a real server (``python -m diffutron serve``) on a free 127.0.0.1 port, then sends the
same set of streaming chat requests twice:

1. one after another (one client), and
2. from N concurrent clients (default 8),

and prints total completion tokens/s of both, their ratio (the issue's target: >= 2x), p50/p95
latency (request sent -> ``[DONE]``), p50 time to the first text chunk, the batches the
server ran, and the server's peak resident memory (VmHWM). Everything is bounded: a fixed
number of requests, a timeout per request and a deadline for the whole run.

    .venv/bin/python benchmarks/serve_load.py                   # tiny model, 8 clients, 32 requests
    .venv/bin/python benchmarks/serve_load.py --model DIR --clients 16 --requests 64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PROMPTS = [
    "Türkiye'nin başkenti neresidir?",
    "Kitap okumak insanın ufkunu genişletir mi?",
    "Çay nasıl demlenir?",
    "İstanbul Boğazı hangi iki kıtayı birbirine bağlar?",
    "Öğretmen öğrencilere hangi soruyu sordu?",
    "Kışın dağlara kar yağar mı?",
    "Iğdır ve Ağrı hangi bölgededir?",
    "Yapay zekâ modelleri metin üretebilir mi?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident set size (Linux VmHWM), in MiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, all threads) the process has used so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    i = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[i]


async def one_request(http: httpx.AsyncClient, body: dict, timeout: float) -> dict:
    """One streaming chat request: latency, time to first text, completion tokens."""
    t0 = time.perf_counter()
    first = None
    usage = None
    done = False

    async def read():
        nonlocal first, usage, done
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if first is None and any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                    first = time.perf_counter() - t0

    await asyncio.wait_for(read(), timeout)
    if not done or usage is None:
        raise RuntimeError("stream ended without usage or [DONE]")
    latency = time.perf_counter() - t0
    return {"latency": latency, "ttft": first if first is not None else latency,
            "tokens": usage["completion_tokens"]}


async def run_phase(base: str, bodies: list[dict], clients: int, timeout: float) -> dict:
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    results, errors = [], []

    async def worker(http):
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                results.append(await one_request(http, body, timeout))
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(err).__name__}: {err}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    lat = [r["latency"] for r in results]
    return {
        "clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
        "wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall if wall else 0.0,
        "requests_per_s": len(results) / wall if wall else 0.0,
        "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95),
        "p50_ttft_s": pct([r["ttft"] for r in results], 50),
    }


def start_server(args, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffutron", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--max-batch-size", str(max(args.clients, args.max_batch_size)),
           "--max-queue", str(max(256, args.requests))]
    if args.model:
        cmd += ["--model", args.model]
    if args.device:
        cmd += ["--device", args.device]
    if args.batch_wait_ms is not None:
        cmd += ["--batch-wait-ms", str(args.batch_wait_ms)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(base: str, proc: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start in time")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or hub id (default: the server's default)")
    p.add_argument("--device", default=None)
    p.add_argument("--clients", type=int, default=8, help="concurrent clients in the batched phase (default 8)")
    p.add_argument("--requests", type=int, default=32, help="requests per phase (default 32, at most 1000)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--steps", type=int, default=None, help="steps of each request (default: the server's)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=None, help="passed to the server (default: its own)")
    p.add_argument("--repeat", type=int, default=2,
                   help="run the sequential/concurrent pair this many times, alternating (default 2); "
                        "the figures are the medians (the machine's speed drifts between phases)")
    p.add_argument("--timeout", type=float, default=600, help="deadline for the whole run in seconds (default 600)")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 1000 or not 1 <= args.repeat <= 10:
        p.error("--clients must be 1..256, --requests 1..1000, --repeat 1..10")

    deadline = time.monotonic() + args.timeout
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bodies = []
    for i in range(args.requests):
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "seed": i,
                "max_tokens": args.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        if args.steps:
            body["steps"] = args.steps
        bodies.append(body)

    log = tempfile.NamedTemporaryFile("w+", prefix="serve_load_", suffix=".log", delete=False)
    env_threads = os.environ.get("OMP_NUM_THREADS", "(unset)")
    proc = start_server(args, port, log)
    try:
        t0 = time.monotonic()
        wait_ready(base, proc, deadline)
        startup = time.monotonic() - t0

        async def bench():
            left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
            await asyncio.wait_for(run_phase(base, bodies[:2], 2, args.request_timeout), left())  # warm-up
            rounds = []
            for _ in range(args.repeat):
                pair = []
                for clients in (1, args.clients):
                    before, cpu0 = httpx.get(base + "/health").json()["stats"], cpu_seconds(proc.pid)
                    r = await asyncio.wait_for(run_phase(base, bodies, clients, args.request_timeout), left())
                    after, cpu1 = httpx.get(base + "/health").json()["stats"], cpu_seconds(proc.pid)
                    r["server_batches"] = after["batches"] - before["batches"]
                    r["server_cpu_s"] = cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else float("nan")
                    pair.append(r)
                rounds.append(tuple(pair))
            return rounds

        rounds = asyncio.run(bench())
        peak = peak_rss_mib(proc.pid)
    except (RuntimeError, asyncio.TimeoutError, TimeoutError) as err:
        log.seek(0)
        print(f"serve_load: failed: {err}\n--- server log ---\n{log.read()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        os.unlink(log.name)

    ratios = [c["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else float("nan") for s, c in rounds]
    median = sorted(range(len(rounds)), key=lambda i: ratios[i])[(len(rounds) - 1) // 2]
    print(f"diffutron serve load test: {args.requests} streaming chat requests per phase, max_tokens "
          f"{args.max_tokens}, model {args.model or '(default)'}, OMP_NUM_THREADS={env_threads}, "
          f"server start {startup:.1f} s")
    print(f"{'round':<6}{'phase':<12}{'clients':>8}{'errors':>7}{'wall s':>8}{'tokens':>7}{'tok/s':>8}{'req/s':>7}"
          f"{'p50 s':>7}{'p95 s':>7}{'ttft50':>7}{'batches':>8}{'srv cpu s':>10}")
    for i, pair in enumerate(rounds):
        for name, r in zip(("sequential", "concurrent"), pair):
            print(f"{i + 1:<6}{name:<12}{r['clients']:>8}{r['errors']:>7}{r['wall_s']:>8.2f}{r['completion_tokens']:>7}"
                  f"{r['tokens_per_s']:>8.1f}{r['requests_per_s']:>7.2f}{r['p50_latency_s']:>7.3f}"
                  f"{r['p95_latency_s']:>7.3f}{r['p50_ttft_s']:>7.3f}{r['server_batches']:>8}{r['server_cpu_s']:>10.2f}")
        s, c = pair
        eff = s["server_cpu_s"] / c["server_cpu_s"] if c["server_cpu_s"] else float("nan")
        print(f"{'':<6}speed-up {ratios[i]:.2f}x in tokens/s; the server spent {eff:.2f}x less CPU per token batched")
    print(f"batching speed-up (tokens/s, {args.clients} concurrent clients / sequential): median {ratios[median]:.2f}x "
          f"over {len(rounds)} round(s)")
    print(f"server peak memory (VmHWM): {peak:.0f} MiB" if peak is not None else "server peak memory: n/a")
    errors = 0
    for pair in rounds:
        for r in pair:
            errors += r["errors"]
            for e in r["error_samples"]:
                print("error:", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": [{"sequential": s, "concurrent": c} for s, c in rounds], "speedups": ratios,
                       "median_speedup": ratios[median], "peak_rss_mib": peak, "settings": vars(args)}, f, indent=2)
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
