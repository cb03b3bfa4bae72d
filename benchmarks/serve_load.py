"""A bounded loopback load test of `bard-deploy serve`: C clients each send R chat requests one after another
(greedy, the embedded task's questions, half with an image as a data: URL) to a server started in this process,
at each --max-batch; it stops by itself. Reports per setting: requests answered (nothing may be lost), p50 / p99
latency, aggregate completion tokens/s, mean batch size.

    python benchmarks/serve_load.py --model DIR [--clients 64] [--requests 10] [--max-batches 1,4,8]
        [--max-tokens 32] [--threads N]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import threading
import time
import urllib.request


class Tally:
    """What the clients saw (appended under a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.tokens: list[int] = []
        self.failures: list[str] = []


def client(url: str, bodies: list[dict], got: Tally) -> None:
    """One client: its requests one after another, each timed from sending to the whole answer."""
    for body in bodies:
        t0 = time.perf_counter()
        req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=600) as resp:
                out = json.loads(resp.read())
        except OSError as e:
            with got.lock:
                got.failures.append(str(e))
            continue
        with got.lock:
            got.latencies.append(time.perf_counter() - t0)
            got.tokens.append(out["usage"]["completion_tokens"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--max-batches", default="1,4,8")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()

    from bard_deploy.data.synthetic import make_sample
    from bard_deploy.runtimes.api import Pipeline
    from bard_deploy.serve import ServeOptions, Server

    pipe = Pipeline.load(a.model, threads=a.threads)
    bodies = []
    for i in range(a.clients * a.requests):
        s = make_sample(10_000 + i)
        parts = [{"type": "text", "text": s.question}]
        if i % 2:
            buf = io.BytesIO()
            s.image().save(buf, format="PNG")
            parts.insert(0, {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()}})
        bodies.append({"model": "m", "messages": [{"role": "user", "content": parts}], "max_tokens": a.max_tokens})
    rows = []
    for max_batch in [int(x) for x in a.max_batches.split(",")]:
        o = ServeOptions(port=0, max_batch=max_batch, max_queue=a.clients * 2, model_name="m", request_timeout=600)
        with Server(pipe, o, "m") as server:
            got = Tally()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(server.url, bodies[c * a.requests:(c + 1) * a.requests],
                                                             got)) for c in range(a.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            m = server.server.config.app.state.metrics
            q = statistics.quantiles(got.latencies, n=100) if len(got.latencies) > 1 else [0.0] * 99
            rows.append({"max_batch": max_batch, "sent": len(bodies), "answered": len(got.latencies),
                         "failed": len(got.failures), "p50_s": round(statistics.median(got.latencies), 3),
                         "p99_s": round(q[98], 3), "tokens_per_s": round(sum(got.tokens) / wall, 1),
                         "mean_batch": round(m.batch.sum / max(m.batch.count, 1), 2), "wall_s": round(wall, 1)})
            print(f"max_batch {max_batch}: {rows[-1]['answered']}/{len(bodies)} answered, p50 {rows[-1]['p50_s']} s, "
                  f"p99 {rows[-1]['p99_s']} s, {rows[-1]['tokens_per_s']} tok/s, mean batch "
                  f"{rows[-1]['mean_batch']}, {rows[-1]['wall_s']} s", flush=True)
    print(json.dumps({"model": a.model, "clients": a.clients, "requests_per_client": a.requests,
                      "max_tokens": a.max_tokens, "threads": pipe.threads.backend, "rows": rows}))


if __name__ == "__main__":
    main()
