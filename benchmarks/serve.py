"""Load test of `culturalign serve` on loopback: batching versus one-at-a-time serving, in one run.

    python benchmarks/serve.py [--requests 16] [--rounds 2] [--max-tokens 16] [--levels 1,4,16] [--threads 1]
    python benchmarks/serve.py --stream [--requests 8] [--rounds 2] [--max-tokens 32]     (writes serve-stream.json)

Two servers run in this process (uvicorn in threads, on 127.0.0.1 and free ports), sharing the
embedded model and the shipped experts: one batching (`--max-batch 16`, 10 ms window, the
defaults), one serving one request at a time (`--max-batch 1`). Only one is driven at a time.
Clients are threads, each with its own keep-alive HTTP connection, sending short chat requests
(greedy, max_tokens 16) that cycle over the base model and every expert, so that a batch mixes soft
prompts (with `--stream`, see below). Each concurrency level runs `--rounds` rounds of `--requests` requests per server, the
order alternating (batched first, then one-at-a-time first, ...), so that a change in the machine's
background load falls on both. torch uses one intra-op thread by default: on a CPU shared with
other jobs, two threads stall on each other whenever one core is taken, and timings scatter.

Printed per mode and level: throughput (requests/s and generated tokens/s), p50/p95 latency, errors
(must be 0) and the mean rows per generate call; then the speed-up of batching (throughput with /
without) per level, and how many answers were the same in both modes (greedy decoding; a row in a
padded batch can differ from the row alone by float rounding). The table is also written as JSON.

`--stream`: streamed requests (`stream: true`) against two batching servers, one streaming token by
token (`stream_mode` "tokens", the default) and one streaming the whole answer once it is generated
(`stream_mode` "answer", as the server did before), rounds alternating between them as above. Per
mode and level: time to first token (the first content chunk's arrival, from sending the request) and
total time (to `[DONE]`), median and p95 over all requests of all rounds, throughput, the mean rows
per generate call, and how many streamed texts were the same in both modes. Each level sends max(`--requests`, concurrency) requests
per round. Written to `serve-stream.json` unless `--out` says otherwise.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from culturalign.backends import load_backend
from culturalign.committee.compose import load_committee
from culturalign.display import quiet_libraries
from culturalign.serve import ServeConfig, create_app
from culturalign.serve.server import bind, uvicorn_server

QUESTIONS = [
    "How should I greet my host's parents?",
    "What is a good gift for a colleague?",
    "Who should pay when friends eat out?",
    "How do people celebrate a wedding?",
    "Is it rude to arrive late to dinner?",
    "How should children address their teachers?",
    "What do families do on holidays?",
    "How do you thank a neighbour for help?",
]


class Served:
    """The app on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        self.app, self.sock = app, bind("127.0.0.1", 0)
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def address(self):
        return self.sock.getsockname()[:2]


def post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status, json.loads(data) if data else {}


def drive(address, requests: list[dict], concurrency: int, timeout: float) -> dict:
    """Send `requests` with `concurrency` client threads; latencies, errors, answers."""
    nxt, lock = iter(range(len(requests))), threading.Lock()
    latencies, errors, answers, tokens = [], [], {}, [0]

    def client():
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            t = time.perf_counter()
            try:
                status, data = post(conn, requests[i])
            except (OSError, http.client.HTTPException, ValueError) as e:
                status, data = -1, {"error": str(e)}
                conn.close()
                conn = http.client.HTTPConnection(*address, timeout=timeout)
            dt = time.perf_counter() - t
            with lock:
                if status == 200:
                    latencies.append(dt)
                    answers[i] = data["choices"][0]["message"]["content"]
                    tokens[0] += data["usage"]["completion_tokens"]
                else:
                    errors.append((status, data))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(requests), "errors": len(errors), "seconds": wall, "latencies": latencies,
            "tokens": tokens[0], "answers": answers, "error_examples": errors[:3]}


def stream_post(conn: http.client.HTTPConnection, body: dict) -> tuple[int, dict]:
    """One streamed request: (status, {ttft, total, text, tokens}) with times from sending it."""
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", headers={"Content-Type": "application/json"},
                 body=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}))
    r = conn.getresponse()
    if r.status != 200:
        data = r.read()
        return r.status, json.loads(data) if data else {}
    first, text, tokens = None, [], 0
    while line := r.readline():
        if not line.startswith(b"data: "):
            continue
        payload = line[6:].strip()
        if payload == b"[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            r.read()
            return -2, event
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                first = first or time.perf_counter()
                text.append(choice["delta"]["content"])
        tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
    total = time.perf_counter() - t
    r.read()  # the end of the chunked body: the connection stays usable
    return 200, {"ttft": (first or t + total) - t, "total": total, "text": "".join(text), "tokens": tokens}


def drive_stream(address, requests: list[dict], concurrency: int, timeout: float) -> dict:
    """`drive` for streamed requests: time to first token and total time per request."""
    nxt, lock = iter(range(len(requests))), threading.Lock()
    ttft, totals, errors, answers, tokens = [], [], [], {}, [0]

    def client():
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                break
            try:
                status, data = stream_post(conn, requests[i])
            except (OSError, http.client.HTTPException, ValueError) as e:
                status, data = -1, {"error": str(e)}
                conn.close()
                conn = http.client.HTTPConnection(*address, timeout=timeout)
            with lock:
                if status == 200:
                    ttft.append(data["ttft"])
                    totals.append(data["total"])
                    answers[i] = data["text"]
                    tokens[0] += data["tokens"]
                else:
                    errors.append((status, data))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"requests": len(requests), "errors": len(errors), "seconds": time.perf_counter() - t0, "ttft": ttft,
            "total": totals, "tokens": tokens[0], "answers": answers, "error_examples": errors[:3]}


def p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[18] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def alternate(apps: dict, served: dict, drive_fn, requests: list[dict], c: int, rounds: int):
    """`rounds` rounds of `requests` at concurrency `c` against each of the two served apps, in ABBA order so that a
    drifting load hits both. Returns each mode's per-round results, its (generate calls, rows) and how many answers
    were the same in both modes, summed over the rounds."""
    runs = {mode: [] for mode in served}
    batches = {mode: [0, 0] for mode in served}
    same = 0
    for k in range(rounds):
        order = list(served) if k % 2 == 0 else list(reversed(served))
        answers = {}
        for mode in order:
            stats = apps[mode].state.server.batcher.stats
            b0, r0 = stats.batches, stats.rows
            r = drive_fn(served[mode].address, requests, c, ServeConfig.timeout)
            batches[mode][0] += stats.batches - b0
            batches[mode][1] += stats.rows - r0
            answers[mode] = r.pop("answers")
            runs[mode].append(r)
            if r["errors"]:
                print(f"  errors ({mode}, concurrency {c}): {r['error_examples']}", flush=True)
        a, b = served
        same += sum(answers[a].get(i) == answers[b].get(i) for i in range(len(requests)))
    return runs, batches, same


def stream_benchmark(args, backend, committee, models: list[str], levels: list[int]) -> None:
    """Token-by-token streaming against whole-answer streaming, both batching, rounds alternating (see the docstring)."""
    apps = {mode: create_app(backend, committee, ServeConfig(max_batch=args.max_batch, stream_mode=mode))
            for mode in ("tokens", "answer")}

    def batch(n: int) -> list[dict]:
        return [{"model": models[i % len(models)], "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                 "max_tokens": args.max_tokens, "temperature": 0} for i in range(n)]

    rows, same, compared = [], {}, {}
    began = time.perf_counter()
    with Served(apps["tokens"]) as on, Served(apps["answer"]) as off:
        served = {"tokens": on, "answer": off}
        for s in served.values():
            drive_stream(s.address, batch(2), 1, ServeConfig.timeout)  # warm-up
        for c in levels:
            requests = batch(max(args.requests, c))
            runs, batches, same[c] = alternate(apps, served, drive_stream, requests, c, args.rounds)
            compared[c] = len(requests) * args.rounds
            for mode in served:
                ttft = [x for r in runs[mode] for x in r["ttft"]]
                total = [x for r in runs[mode] for x in r["total"]]
                seconds = sum(r["seconds"] for r in runs[mode])
                row = {"stream_mode": mode, "concurrency": c, "requests": sum(r["requests"] for r in runs[mode]),
                       "errors": sum(r["errors"] for r in runs[mode]),
                       "ttft_p50": statistics.median(ttft) if ttft else float("nan"), "ttft_p95": p95(ttft),
                       "total_p50": statistics.median(total) if total else float("nan"), "total_p95": p95(total),
                       "throughput": len(total) / seconds, "tokens_per_s": sum(r["tokens"] for r in runs[mode]) / seconds,
                       "mean_batch": batches[mode][1] / batches[mode][0] if batches[mode][0] else 0.0}
                rows.append(row)
                print(f"  {mode:6} concurrency {c:2d}: first token p50 {row['ttft_p50']:.2f} s, total p50 "
                      f"{row['total_p50']:.2f} s, {row['errors']} errors", flush=True)
    wall = time.perf_counter() - began
    print()
    print("| streaming | concurrency | requests | errors | first token p50 (s) | first token p95 (s) | total p50 (s) | "
          "total p95 (s) | throughput (req/s) | rows per generate call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["stream_mode"] != "tokens")):
        name = "token by token" if r["stream_mode"] == "tokens" else "whole answer"
        print(f"| {name} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
              f"{r['total_p50']:.2f} | {r['total_p95']:.2f} | {r['throughput']:.2f} | {r['mean_batch']:.1f} |")
    print()
    for c in levels:
        on, off = (next(r for r in rows if r["stream_mode"] == m and r["concurrency"] == c) for m in ("tokens", "answer"))
        print(f"concurrency {c:2d}: first token {off['ttft_p50']:.2f} s -> {on['ttft_p50']:.2f} s "
              f"({off['ttft_p50'] / on['ttft_p50']:.1f}x sooner); total {off['total_p50']:.2f} s -> {on['total_p50']:.2f} s; "
              f"same text in both modes for {same[c]}/{compared[c]} requests")
    total_errors = sum(r["errors"] for r in rows)
    print(f"errors in all: {total_errors}; {wall:.0f} s of load")
    result = {"model": backend.name, "device": str(backend.device), "threads": torch.get_num_threads(),
              "rounds": args.rounds, "requests_per_round": {str(c): max(args.requests, c) for c in levels},
              "max_tokens": args.max_tokens, "max_batch": args.max_batch, "models": models,
              "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              "same_text": {str(c): f"{same[c]}/{compared[c]}" for c in levels}, "errors": total_errors,
              "load_seconds": round(wall, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if total_errors:
        raise SystemExit(1)


def pooled(runs: list[dict]) -> dict:
    """One row from several rounds: throughput over their total time, latency quantiles over all requests."""
    lat = [x for r in runs for x in r["latencies"]]
    seconds = sum(r["seconds"] for r in runs)
    q = statistics.quantiles(lat, n=20, method="inclusive") if len(lat) > 1 else lat * 19
    return {"requests": sum(r["requests"] for r in runs), "errors": sum(r["errors"] for r in runs), "seconds": seconds,
            "throughput": len(lat) / seconds, "tokens_per_s": sum(r["tokens"] for r in runs) / seconds,
            "p50": statistics.median(lat) if lat else float("nan"), "p95": q[18] if q else float("nan")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--experts", default=None)
    ap.add_argument("--requests", type=int, default=16, help="requests per round, mode and concurrency level")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per level; the modes alternate within each")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=ServeConfig.max_batch)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared CPU)")
    ap.add_argument("--stream", action="store_true",
                    help="time to first token: token-by-token against whole-answer streaming (see above)")
    ap.add_argument("--out", default=None, help="the JSON written (default: serve.json, with --stream serve-stream.json)")
    args = ap.parse_args()
    args.out = args.out or str(Path(__file__).with_name("serve-stream.json" if args.stream else "serve.json"))
    quiet_libraries()
    torch.set_num_threads(args.threads)
    levels = [int(x) for x in args.levels.split(",")]
    t0 = time.perf_counter()
    backend = load_backend(args.model)
    committee = load_committee(backend, args.experts)
    models = [backend.name] + [f"culturalign/{c}" for c in committee.registry.codes]
    print(f"model {backend.name} on {backend.device} ({torch.get_num_threads()} threads), {len(models) - 1} experts, "
          f"loaded in {time.perf_counter() - t0:.1f} s; {args.rounds} rounds x {args.requests} requests per level and mode, "
          f"max_tokens {args.max_tokens}, greedy, models cycled: {', '.join(models)}", flush=True)
    if args.stream:
        return stream_benchmark(args, backend, committee, models, levels)
    requests = [{"model": models[i % len(models)], "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                 "max_tokens": args.max_tokens, "temperature": 0} for i in range(args.requests)]
    configs = {"batched": ServeConfig(max_batch=args.max_batch), "one-at-a-time": ServeConfig(max_batch=1)}
    apps = {mode: create_app(backend, committee, cfg) for mode, cfg in configs.items()}
    rows, same, compared = [], {}, {}
    began = time.perf_counter()
    with Served(apps["batched"]) as on, Served(apps["one-at-a-time"]) as off:
        served = {"batched": on, "one-at-a-time": off}
        for s in served.values():
            drive(s.address, requests[:2], 1, ServeConfig.timeout)  # warm-up
        for c in levels:
            runs, batches, same[c] = alternate(apps, served, drive, requests, c, args.rounds)
            compared[c] = len(requests) * args.rounds
            for mode in served:
                row = {"mode": mode, "concurrency": c, **pooled(runs[mode])}
                row["mean_batch"] = batches[mode][1] / batches[mode][0] if batches[mode][0] else 0.0
                rows.append(row)
                print(f"  {mode:13} concurrency {c:2d}: {row['throughput']:.2f} req/s, p50 {row['p50']:.2f} s, "
                      f"{row['errors']} errors", flush=True)
    wall = time.perf_counter() - began
    print()
    print("| mode | concurrency | requests | errors | throughput (req/s) | tokens/s | p50 latency (s) | p95 latency (s) | rows per generate call |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["mode"] != "batched", r["concurrency"])):
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['throughput']:.2f} | "
              f"{r['tokens_per_s']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['mean_batch']:.1f} |")
    print()
    speedups = {}
    for c in levels:
        on = next(r for r in rows if r["mode"] == "batched" and r["concurrency"] == c)
        off = next(r for r in rows if r["mode"] == "one-at-a-time" and r["concurrency"] == c)
        speedups[c] = on["throughput"] / off["throughput"]
        print(f"concurrency {c:2d}: batching speed-up {speedups[c]:.2f}x (throughput); p50 latency {off['p50']:.2f} s -> "
              f"{on['p50']:.2f} s; same answer in both modes for {same[c]}/{compared[c]} requests")
    total_errors = sum(r["errors"] for r in rows)
    print(f"errors in all: {total_errors}; {wall:.0f} s of load")
    result = {"model": backend.name, "device": str(backend.device), "threads": torch.get_num_threads(),
              "rounds": args.rounds, "requests_per_round": args.requests, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "models": models,
              "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
              "speedup": {str(c): round(v, 3) for c, v in speedups.items()},
              "same_answers": {str(c): f"{same[c]}/{compared[c]}" for c in levels}, "errors": total_errors,
              "load_seconds": round(wall, 1)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if total_errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
