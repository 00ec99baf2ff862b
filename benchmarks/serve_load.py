"""Load benchmark of ``diffutron serve``: throughput and latency at 1, 8, 32 and 128 concurrent clients.

Starts one real server (``python -m diffutron serve``) on a free 127.0.0.1 port and, for each level
of concurrency, runs that many closed-loop clients (each sends its next chat request as soon as its
answer is in) for a fixed window. Per level it prints completion tokens/s, requests/s, p50/p95
latency (request sent -> whole answer), p50 time to the first text chunk (``--stream``), and what
the server did meanwhile (its ``/health`` counters): batches started, blocks decoded, answers that
joined a batch already running, mean answers per block. Rows join a running batch at block
boundaries (continuous batching), so at a steady load the batch stays full.

The window of a level opens once every client has had its first answer (or after ``--seconds``),
so that the ramp-up is not measured; tokens/s counts the answers completed inside the window.
When the window closes the clients hang up (the server cancels what they left) and the next level
starts on an idle server. Everything is bounded by ``--deadline`` (the whole run, server start
and warm-up included): windows shrink to fit and levels that do not fit are skipped, and said so.

The model: the server's default (the embedded tiny model), ``--model DIR``, or ``--random SHAPE``:
random weights of a real shape (``mmbert-base`` = DiffutronLM-0.3B, ``mmbert-small``) with a
word-level tokenizer as large as its vocabulary, saved to a temporary directory first. The server
prints its compile and warm-up (``--compile``, the default on a GPU) as it goes; they are shown
here with the time since the start.

    .venv/bin/python benchmarks/serve_load.py --quick                     # CPU: embedded model, ~1 min
    .venv/bin/python benchmarks/serve_load.py --clients 1,8 --stream --json out.json
    python3 benchmarks/serve_load.py --random mmbert-base --deadline 160  # a GPU: 0.3B shape, compiled (~60 s warm-up)
    python3 benchmarks/serve_load.py --model DIR --server-args "--compile --max-batch-size 128"

Uses only the standard library as the HTTP client (plus torch/transformers for ``--random``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

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

T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


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


# ------------------------------------------------------------------------------ a random model
def save_random_model(shape: str, directory: Path) -> None:
    """Random weights of ``shape`` (benchmarks/_models.py) and a word-level tokenizer with one
    token per vocabulary entry (the chat markers, some Turkish words, then w0, w1, ...), in bf16."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _models

    from diffutron.lm import DiffusionLM
    from diffutron.tiny import CHAT_MARKERS, SAMPLE_TEXTS

    if shape == "tiny":  # the tests' tiny random model (writes whole answers: no early end of turn)
        from diffutron.tiny import tiny_lm

        tiny_lm().save_pretrained(directory)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"  # filled on a GPU: milliseconds
    model = _models.random_mmbert(shape, device=device).to(torch.bfloat16)
    vocab_size = model.config.vocab_size
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    vocab: dict[str, int] = {}
    for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"] + CHAT_MARKERS + sorted(
            {w for text in SAMPLE_TEXTS + PROMPTS for w, _ in pre.pre_tokenize_str(text)}):
        vocab.setdefault(t, len(vocab))
    i = 0
    while len(vocab) < vocab_size:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]", model_max_length=8192)
    fast.add_tokens(CHAT_MARKERS)  # already in the vocabulary: kept whole, same ids
    model.config.pad_token_id, model.config.eos_token_id = fast.pad_token_id, fast.eos_token_id
    DiffusionLM(model, fast, name=f"random-{shape}").save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the server loads its own copy


# ------------------------------------------------------------------------------ HTTP (stdlib)
async def http(port: int, method: str, path: str, body: dict | None = None, on_data=None,
               timeout: float = 60.0) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection; ``on_data(bytes)`` sees each piece of the body."""

    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            payload = b"" if body is None else json.dumps(body).encode()
            head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n")
            writer.write(head.encode() + payload)
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            headers = {}
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                k, _, v = line.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            parts = []
            if headers.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await reader.readline()).split(b";")[0], 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size)
                    await reader.readexactly(2)
                    parts.append(data)
                    if on_data is not None:
                        on_data(data)
            elif "content-length" in headers:
                parts.append(await reader.readexactly(int(headers["content-length"])))
            else:
                parts.append(await reader.read())
            return status, b"".join(parts)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


async def health(port: int) -> dict:
    status, data = await http(port, "GET", "/health", timeout=10)
    if status != 200:
        raise RuntimeError(f"/health answered HTTP {status}")
    return json.loads(data)


async def one_request(port: int, body: dict, timeout: float) -> dict:
    """A chat request: its latency, time to the first text chunk (streaming) and completion tokens."""
    t0 = time.perf_counter()
    first = None
    buf = b""

    def on_data(data: bytes) -> None:
        nonlocal first, buf
        if first is None:
            buf += data
            if b'"content":"' in buf.replace(b'"content":""', b""):
                first = time.perf_counter() - t0
                buf = b""

    status, data = await http(port, "POST", "/v1/chat/completions", body, on_data if body.get("stream") else None,
                              timeout)
    latency = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
    if body.get("stream"):
        usage = None
        events = [line[6:] for line in data.decode().split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            raise RuntimeError("stream ended without [DONE]")
        for e in events[:-1]:
            chunk = json.loads(e)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
    else:
        usage = json.loads(data)["usage"]
    if usage is None:
        raise RuntimeError("no usage in the answer")
    return {"latency": latency, "ttft": first, "tokens": usage["completion_tokens"], "end": time.perf_counter()}


# ------------------------------------------------------------------------------ one level
async def run_level(port: int, clients: int, window: float, longest: float, args) -> dict:
    """``clients`` closed-loop clients; measured from when each has had one answer (at most
    ``window`` seconds after the start) for ``window`` seconds, or longer (at most ``longest``)
    until a few answers are in."""
    done: list[dict] = []
    errors: list[str] = []
    first_answers = set()
    opened = asyncio.Event()
    counter = 0

    def body(c: int) -> dict:
        nonlocal counter
        counter += 1
        b = {"messages": [{"role": "user", "content": PROMPTS[(c + counter) % len(PROMPTS)]}], "seed": counter,
             "max_tokens": args.max_tokens}
        if args.steps:
            b["steps"] = args.steps
        if args.stream:
            b["stream"] = True
            b["stream_options"] = {"include_usage": True}
        return b

    async def client(c: int):
        while True:
            try:
                r = await one_request(port, body(c), args.request_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(err).__name__}: {err}")
                await asyncio.sleep(0.05)
                continue
            done.append(r)
            first_answers.add(c)
            if len(first_answers) == clients:
                opened.set()

    t_start = time.perf_counter()
    tasks = [asyncio.ensure_future(client(c)) for c in range(clients)]
    try:
        await asyncio.wait_for(opened.wait(), window)
    except asyncio.TimeoutError:
        pass
    t_open = time.perf_counter()
    h0, cpu0 = await health(port), cpu_seconds(args.server_pid)
    n_open, err_open = len(done), len(errors)
    await asyncio.sleep(window)
    while len(done) - n_open < min(clients, 4) and time.perf_counter() - t_open < longest:  # a slow machine
        await asyncio.sleep(0.05)
    t_close = time.perf_counter()
    h1, cpu1 = await health(port), cpu_seconds(args.server_pid)
    measured = [r for r in done[n_open:] if r["end"] <= t_close]
    for t in tasks:  # hang up: the server cancels what they leave
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _ in range(200):  # the next level starts on an idle server
        h = await health(port)
        if not h["running_rows"] and not h["queued"]:
            break
        await asyncio.sleep(0.05)

    span = t_close - t_open
    tokens = sum(r["tokens"] for r in measured)
    lat = [r["latency"] for r in measured]
    ttft = [r["ttft"] for r in measured if r["ttft"] is not None]
    s0, s1 = h0["stats"], h1["stats"]
    blocks = s1.get("blocks", 0) - s0.get("blocks", 0)
    return {
        "clients": clients, "ramp_s": t_open - t_start, "window_s": span, "requests": len(measured),
        "errors": len(errors) - err_open, "error_samples": errors[:3],
        "completion_tokens": tokens, "tokens_per_s": tokens / span, "requests_per_s": len(measured) / span,
        "p50_latency_s": pct(lat, 50), "p95_latency_s": pct(lat, 95),
        "p50_ttft_s": pct(ttft, 50) if ttft else None,
        "server_batches": s1["batches"] - s0["batches"], "server_blocks": blocks,
        "server_joined_running": s1.get("joined_running", 0) - s0.get("joined_running", 0),
        "rows_per_block": (s1.get("block_rows", 0) - s0.get("block_rows", 0)) / blocks if blocks else None,
        "server_max_batch_rows": s1.get("max_batch_rows"),
        "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
    }


# ------------------------------------------------------------------------------ the server
def start_server(args, port: int, model_dir: str | None, log_path: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffutron", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", "--max-queue", str(max(256, 2 * max(args.levels)))]
    if model_dir:
        cmd += ["--model", model_dir]
    cmd += shlex.split(args.server_args)  # last: they override the above
    say("server: " + " ".join(shlex.quote(c) for c in cmd[1:]))
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


ALONE = re.compile(r"the engine alone at batch (\d+): ([\d,.]+) tokens/s")


def echo_log(path: str, stop: threading.Event, found: dict) -> None:
    """Show the server's own lines (model, compile, warm-up) as they come, with the time; keep the
    engine's own batch figure of the warm-up (GPU) in ``found``."""
    with open(path, errors="replace") as f:
        while not stop.is_set():
            line = f.readline()
            if not line:
                time.sleep(0.1)
                continue
            line = line.rstrip()
            if line.startswith("diffutron:") or "Error" in line or "error" in line:
                say("  | " + line)
            m = ALONE.search(line)
            if m:
                found.update(batch=int(m.group(1)), tokens_per_s=float(m.group(2).replace(",", "")))


def wait_ready(port: int, proc: subprocess.Popen, deadline: float) -> dict:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            return asyncio.run(health(port))
        except (OSError, RuntimeError, asyncio.TimeoutError, ValueError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not start before the deadline")


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="model directory or hub id (default: the server's default)")
    src.add_argument("--random", default=None, metavar="SHAPE", choices=["mmbert-base", "mmbert-small", "tiny"],
                     help="random weights of this shape (mmbert-base = DiffutronLM-0.3B, mmbert-small, or tiny: the "
                          "tests' tiny model) with a tokenizer as large as its vocabulary, saved to a temporary "
                          "directory (default with --quick: tiny)")
    p.add_argument("--clients", default="1,8,32,128",
                   help="concurrency levels, comma-separated, run in this order (default 1,8,32,128; the table "
                        "lists them sorted): put the one that matters first when the deadline is tight")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured window per level (default 3; 1.5 with --quick); the ramp-up before it is at "
                        "most as long")
    p.add_argument("--quick", action="store_true",
                   help="short windows, and the tiny random model unless --model/--random say otherwise (a smoke run)")
    p.add_argument("--stream", action="store_true", help="streaming requests (measures time to the first text)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (default 64)")
    p.add_argument("--steps", type=int, default=None, help="steps of each request (default: the server's, one per token)")
    p.add_argument("--server-args", default="", help='extra `diffutron serve` flags, e.g. "--compile --max-batch-size 128"')
    p.add_argument("--deadline", type=float, default=600,
                   help="seconds for the whole run, server start and warm-up included (default 600)")
    p.add_argument("--request-timeout", type=float, default=120)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        args.levels = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        p.error("--clients takes integers separated by commas, e.g. 1,8,32,128")
    if not args.levels or not all(1 <= c <= 1024 for c in args.levels):
        p.error("each --clients level must be 1..1024")
    seconds = args.seconds or (1.5 if args.quick else 3.0)
    if args.quick and not args.model and not args.random:
        args.random = "tiny"
    deadline = T0 + args.deadline

    port = free_port()
    tmp = tempfile.mkdtemp(prefix="serve_load_")
    log_path = os.path.join(tmp, "server.log")
    model_dir = args.model
    stop_echo = threading.Event()
    proc = None
    levels, skipped, start, alone = [], [], {}, {}
    try:
        if args.random:
            say(f"building a random {args.random} model and its tokenizer ...")
            model_dir = os.path.join(tmp, "model")
            save_random_model(args.random, Path(model_dir))
            say(f"saved to {model_dir}")
        t_start = time.monotonic()
        proc = start_server(args, port, model_dir, log_path)
        args.server_pid = proc.pid
        threading.Thread(target=echo_log, args=(log_path, stop_echo, alone), daemon=True).start()
        h = wait_ready(port, proc, deadline)
        start = {"seconds": time.monotonic() - t_start, "max_batch_size": h.get("max_batch_size"),
                 "compiled": h.get("compiled"), "model": h.get("model")}
        say(f"server ready after {start['seconds']:.1f} s (model load, compile and warm-up): model {h.get('model')!r}, "
            f"max batch {h.get('max_batch_size')}, compiled {h.get('compiled')}")

        async def bench():
            for i, clients in enumerate(args.levels):
                left = deadline - time.monotonic() - 2.0  # the shutdown
                if left < 1.5:
                    skipped.extend(args.levels[i:])
                    say(f"deadline: skipping {args.levels[i:]} clients")
                    return
                per = left / (len(args.levels) - i)
                window = min(seconds, max(0.5, (per - 0.5) / 2))  # a ramp of at most the window, then the window
                say(f"{clients} clients: ramp-up, then {window:.1f} s measured ...")
                r = await run_level(port, clients, window, max(window, per - window - 1.0), args)
                levels.append(r)
                ttft = f"{r['p50_ttft_s']:.3f}" if r["p50_ttft_s"] is not None else "-"
                say(f"{clients} clients: {r['tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.2f} req/s, p50 "
                    f"{r['p50_latency_s']:.3f} s, p95 {r['p95_latency_s']:.3f} s, first text {ttft} s, "
                    f"{r['errors']} errors")

        asyncio.run(bench())
        peak = peak_rss_mib(proc.pid)
    except (RuntimeError, asyncio.TimeoutError, TimeoutError, OSError) as err:
        with open(log_path, errors="replace") as f:
            print(f"serve_load: failed: {err}\n--- server log ---\n{f.read()[-3000:]}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        stop_echo.set()
        shutil.rmtree(tmp, ignore_errors=True)

    mode = "streaming" if args.stream else "non-streaming"
    model = args.model or (f"random {args.random}" if args.random else "(the server's default)")
    print(f"\ndiffutron serve load test: {mode} chat requests, max_tokens {args.max_tokens}, steps "
          f"{args.steps or 'one per token'}, model {model}, server start {start['seconds']:.1f} s "
          f"(compiled: {start['compiled']}, max batch {start['max_batch_size']}), server args "
          f"{args.server_args or '(none)'}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    print(f"{'clients':>7}{'window s':>9}{'answers':>8}{'errors':>7}{'tok/s':>10}{'req/s':>8}{'p50 s':>8}{'p95 s':>8}"
          f"{'ttft50':>8}{'batches':>8}{'blocks':>7}{'joined':>7}{'rows/blk':>9}{'srv cpu s':>10}")
    levels.sort(key=lambda r: r["clients"])
    for r in levels:
        ttft = f"{r['p50_ttft_s']:.3f}" if r["p50_ttft_s"] is not None else "-"
        rpb = f"{r['rows_per_block']:.1f}" if r["rows_per_block"] is not None else "-"
        cpu = f"{r['server_cpu_s']:.2f}" if r["server_cpu_s"] is not None else "-"
        print(f"{r['clients']:>7}{r['window_s']:>9.2f}{r['requests']:>8}{r['errors']:>7}{r['tokens_per_s']:>10.1f}"
              f"{r['requests_per_s']:>8.2f}{r['p50_latency_s']:>8.3f}{r['p95_latency_s']:>8.3f}{ttft:>8}"
              f"{r['server_batches']:>8}{r['server_blocks']:>7}{r['server_joined_running']:>7}{rpb:>9}{cpu:>10}")
    if skipped:
        print(f"skipped (deadline {args.deadline:.0f} s): {skipped} clients")
    if levels and levels[0]["tokens_per_s"]:
        print("tokens/s relative to the first level: " + ", ".join(
            f"{r['clients']} clients {r['tokens_per_s'] / levels[0]['tokens_per_s']:.2f}x" for r in levels))
    if alone and levels:
        print(f"the engine alone at batch {alone['batch']} (the server's warm-up, same process): "
              f"{alone['tokens_per_s']:,.0f} tokens/s; served: " + ", ".join(
                  f"{r['clients']} clients {100 * r['tokens_per_s'] / alone['tokens_per_s']:.0f}%" for r in levels))
    print(f"server peak memory (VmHWM): {peak:.0f} MiB" if peak is not None else "server peak memory: n/a")
    print(f"total {time.monotonic() - T0:.1f} s")
    errors = sum(r["errors"] for r in levels)
    for r in levels:
        for e in r["error_samples"]:
            print("error:", e)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("server_pid",)}
        with open(args.json, "w") as f:
            json.dump({"levels": levels, "skipped": skipped, "server_start": start, "engine_alone": alone or None,
                       "peak_rss_mib": peak,
                       "total_s": time.monotonic() - T0, "settings": settings}, f, indent=2)
    return 0 if errors == 0 and levels else 1


if __name__ == "__main__":
    sys.exit(main())
