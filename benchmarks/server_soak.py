"""Load test of ``rank1-local serve`` on 127.0.0.1, bounded in clients and time.

``--clients`` threads run for ``--seconds``, each request picked at random: good requests (plain or streamed),
malformed JSON, requests over the limits, and streamed requests whose client disconnects after the first result.
Checked: every good answer holds every document once, and each result equals a direct library call on the same
pair (same reasoning text, score within the batch-invariance tolerance); every bad request gets its 4xx; the
server's memory (RSS) is sampled throughout. Usage:
    python -m benchmarks.server_soak [--clients 8] [--seconds 180] [--out benchmarks/results/server_soak.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.fixture_gguf import fixture_gguf
from benchmarks.server_concurrency import TOLERANCE
from benchmarks.server_process import ServerProcess

HERE = Path(__file__).resolve().parent
MAX_DOCS = 16


def pool(seed: int = 0) -> list[tuple[str, str]]:
    from quantize.fixtures.synthetic_task import all_words, make_pair

    words = all_words()
    rng = random.Random(seed)
    return [(make_pair(q, q).query, make_pair(q, p).passage) for q in rng.sample(words, 8) for p in rng.sample(words, 8)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Soak:
    def __init__(self, server: ServerProcess, expected: dict[tuple[str, str], tuple[float, str]],
                 seconds: float, seed: int) -> None:
        self.server, self.expected, self.seconds = server, expected, seconds
        self.by_query: dict[str, list[str]] = {}
        for q, d in expected:
            self.by_query.setdefault(q, []).append(d)
        self.counts: Counter[str] = Counter()
        self.problems: list[str] = []
        self.max_delta = 0.0
        self.lock = threading.Lock()
        self.seed = seed

    def check(self, query: str, docs: list[str], rows: list[dict]) -> None:
        with self.lock:
            if sorted(r["index"] for r in rows) != list(range(len(docs))):
                self.problems.append(f"lost or duplicated results: {sorted(r['index'] for r in rows)}")
                return
            for row in rows:
                score, reasoning = self.expected[(query, docs[row["index"]])]
                delta = abs(row["relevance_score"] - score)
                self.max_delta = max(self.max_delta, delta)
                if row["reasoning"] != reasoning or delta > TOLERANCE:
                    self.problems.append(f"mixed-up result: {query} / {docs[row['index']]}: "
                                         f"{row['relevance_score']} vs {score}")

    def good(self, http: httpx.Client, rng: random.Random, stream: bool) -> None:
        query = rng.choice(list(self.by_query))
        docs = rng.sample(self.by_query[query], rng.randint(1, 6))
        body = {"query": query, "documents": docs, "return_reasoning": True}
        if not stream:
            r = http.post(self.server.url + "/v1/rerank", json=body)
            self._expect(r.status_code, 200, "good")
            self.check(query, docs, r.json()["results"])
            return
        with http.stream("POST", self.server.url + "/v1/rerank", json=body | {"stream": True}) as r:
            self._expect(r.status_code, 200, "good-stream")
            rows, done = [], None
            event = None
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    if event == "result":
                        rows.append(data)
                    elif event == "done":
                        done = data
        self.check(query, docs, rows)
        if done is None or len(done["results"]) != len(docs):
            with self.lock:
                self.problems.append("stream ended without its done event")

    def bad(self, http: httpx.Client, rng: random.Random, kind: str) -> None:
        if kind == "malformed":
            r = http.post(self.server.url + "/v1/rerank", content=b'{"query": "x", "documents": [1,',
                          headers={"Content-Type": "application/json"})
            self._expect(r.status_code, 422, kind)
        else:
            query = rng.choice(list(self.by_query))
            r = http.post(self.server.url + "/v1/rerank", json={"query": query, "documents": ["x"] * (MAX_DOCS + 1)})
            self._expect(r.status_code, 413, kind)

    def disconnect(self, rng: random.Random) -> None:
        query = rng.choice(list(self.by_query))
        body = json.dumps({"query": query, "documents": self.by_query[query], "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=120) as sock:
            sock.sendall(b"POST /v1/rerank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            data = b""
            while b"event: result" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        with self.lock:
            self.counts["disconnect"] += 1

    def _expect(self, got: int, want: int, kind: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if got != want:
                self.problems.append(f"{kind}: HTTP {got}, expected {want}")

    def client(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        deadline = time.monotonic() + self.seconds
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < deadline:
                roll = rng.random()
                try:
                    if roll < 0.45:
                        self.good(http, rng, stream=False)
                    elif roll < 0.7:
                        self.good(http, rng, stream=True)
                    elif roll < 0.8:
                        self.bad(http, rng, "malformed")
                    elif roll < 0.9:
                        self.bad(http, rng, "oversize")
                    else:
                        self.disconnect(rng)
                except (httpx.HTTPError, OSError) as exc:
                    with self.lock:
                        self.problems.append(f"client error: {type(exc).__name__}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "server_soak.md")
    args = parser.parse_args()
    from rank1_local import Rank1

    model = fixture_gguf("behaving", "Q8_0")
    pairs = pool(args.seed)
    with Rank1(model, n_ctx=512, max_think_tokens=args.budget, parallel=args.parallel, threads=args.threads) as m:
        expected = {p: (r.score, r.reasoning) for p, r in zip(pairs, m.score_pairs(pairs), strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        serve_args = ["--n-ctx", "512", "--max-think-tokens", str(args.budget), "--parallel", str(args.parallel),
                      "--threads", str(args.threads), "--max-documents", str(MAX_DOCS)]
        with ServerProcess(model, serve_args, Path(tmp) / "server.log") as server:
            soak = Soak(server, expected, args.seconds, args.seed)
            samples: list[tuple[float, float]] = []
            threads = [threading.Thread(target=soak.client, args=(k,)) for k in range(args.clients)]
            start = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                samples.append((time.monotonic() - start, rss_mb(server.proc.pid)))
                time.sleep(5)
            for t in threads:
                t.join()
            elapsed = time.monotonic() - start
            metrics = httpx.get(server.url + "/metrics", timeout=30).text
            alive = httpx.get(server.url + "/health", timeout=30).status_code == 200
    cancelled = next((float(line.split()[1]) for line in metrics.splitlines()
                      if line.startswith("rank1_cancelled_pairs_total ")), 0.0)
    first = [mb for t, mb in samples if t <= min(30.0, elapsed / 4)] or [samples[0][1]]
    last = [mb for t, mb in samples if t >= elapsed * 3 / 4] or [samples[-1][1]]
    rows = {"seconds": elapsed, "clients": args.clients, "counts": dict(soak.counts), "problems": soak.problems,
            "max_abs_delta": soak.max_delta, "cancelled_pairs": cancelled, "alive": alive,
            "rss_first_mb": max(first), "rss_last_mb": max(last), "rss_max_mb": max(mb for _, mb in samples)}
    text = "\n".join([
        "# Server load test (127.0.0.1)",
        "",
        f"{args.clients} clients for {elapsed:.0f} s against `rank1-local serve` (`behaving` fixture, Q8_0, "
        f"{args.parallel} slots, budget {args.budget}, at most {MAX_DOCS} documents per request), each request "
        "drawn at random: 45 % good, 25 % good and streamed, 10 % malformed JSON, 10 % over the document limit, "
        "10 % streamed with the client disconnecting after the first result. Each good result is compared with a "
        f"direct library call on the same pair (same reasoning text, |Δscore| ≤ {TOLERANCE:g}).",
        "",
        "| | |",
        "|---|---:|",
        *[f"| requests: {k} | {v} |" for k, v in sorted(soak.counts.items())],
        f"| lost, duplicated or mixed-up results, wrong statuses, client errors | {len(soak.problems)} |",
        f"| largest \\|Δscore\\| against the library | {soak.max_delta:.1e} |",
        f"| pairs cancelled by disconnects (server's count) | {cancelled:.0f} |",
        f"| server RSS, first quarter / last quarter / max (MB) | {rows['rss_first_mb']:.0f} / "
        f"{rows['rss_last_mb']:.0f} / {rows['rss_max_mb']:.0f} |",
        f"| server alive at the end | {'yes' if alive else 'NO'} |",
        "",
        *(["Problems:", "", *[f"- {p}" for p in soak.problems[:20]]] if soak.problems else []),
    ]) + "\n"
    from rank1_local.runs.atomic import write_text_atomic

    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out, text)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(rows | {"rss_samples": samples}, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
