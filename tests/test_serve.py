"""`bard-deploy serve` on loopback and an ephemeral port, driven by the official `openai` client (and raw HTTP for
what the client would refuse to send): chat, streaming per block, images as data URLs, bad requests, dynamic
batching == sequential, overload, disconnects, /metrics."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from bard_deploy.data.synthetic import make_sample
from bard_deploy.embedded import new_checkpoint
from bard_deploy.runtimes.api import Pipeline
from bard_deploy.serve import ServeOptions, Server
from tiny import concurrently

openai = pytest.importorskip("openai")

MODEL = "tiny"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.load(new_checkpoint(tmp_path_factory.mktemp("ck") / "b4", bard={"block_size": 4}, hidden=64,
                                        layers=2))


@pytest.fixture(scope="module")
def server(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_sample(5).image().save(root / "five.png")
    with Server(pipe, ServeOptions(port=0, max_batch=8, max_queue=64, image_root=str(root), model_name=MODEL,
                                   max_request_bytes=2 << 20), MODEL) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(question: str, image=None) -> list[dict]:
    parts = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else [])
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


def post(server, body, path="/v1/chat/completions", raw: bytes | None = None):
    """(status, parsed JSON body) of a raw POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_equals_the_pipeline_and_streams_per_block(client, pipe):
    s = make_sample(3)
    want = pipe.generate(messages=[{"role": "user", "content": [{"type": "image", "image": s.image()},
                                                                {"type": "text", "text": s.question}]}],
                         max_new_tokens=12)
    r = client.chat.completions.create(model=MODEL, messages=ask(s.question, s.image()), max_tokens=12)
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == want.prompt_tokens
    assert r.model == MODEL and r.object == "chat.completion"
    pieces, reasons = [], []
    stream = client.chat.completions.create(model=MODEL, messages=ask(s.question, s.image()), max_tokens=12,
                                            stream=True, stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert len(pieces) >= 2 and "".join(pieces) == want.text              # a chunk per decoded block of 4
    assert reasons == ["length"] and usage.completion_tokens == 12


def test_models_health_and_bard_options(client, server, pipe):
    assert [m.id for m in client.models.list().data] == [MODEL]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    want = pipe.generate("Describe the picture.", max_new_tokens=8, threshold=0.5)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe the picture."}],
                                       max_tokens=8, extra_body={"threshold": 0.5})
    assert r.choices[0].message.content == want.text


def test_a_stop_string_ends_the_answer(client, pipe):
    full = pipe.generate("Describe the picture.", max_new_tokens=16).text
    stop = next(w for w in full.split()[2:] if len(w) > 1)
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe the "
                                                                   "picture."}], max_tokens=16, stop=[stop],
                                           stream=stream)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            text, reason = r.choices[0].message.content, [r.choices[0].finish_reason]
        assert text == full[:full.index(stop)] and reason == ["stop"]


def test_an_image_file_under_the_image_root(client, pipe, server):
    want = pipe.generate("What?", images=[make_sample(5).image()], max_new_tokens=6).text
    r = client.chat.completions.create(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "five.png"}}, {"type": "text", "text": "What?"}]}])
    assert r.choices[0].message.content == want


BAD = [
    ({"model": MODEL}, "'messages' must be a non-empty list"),
    ({"model": MODEL, "messages": []}, "'messages' must be a non-empty list"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "role must be system, user or assistant"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "content must be a string"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "must be a text part"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/a.png"}}]}]}, "not fetched"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "../../etc/passwd"}}]}]}, "escapes the data root"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,@@@"}}]}]}, "invalid base64"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64,aGVsbG8="}}]}]}, "cannot be decoded"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "'max_tokens' must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, "'max_tokens' must"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "'temperature' must"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "'top_p' must"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "threshold": 0}, "threshold=0"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "block_size": 8}, "trained with block size"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "'n' must be 1"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "'stop' must be"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "'tools' is not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1}, "not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temprature": 1}, "unknown field 'temprature'"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": "x"}, "'seed' must be an integer"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "'stream' must be"),
    ([1, 2], "must be a JSON object"),
]


@pytest.mark.parametrize("body, match", BAD, ids=[m for _, m in BAD])
def test_bad_requests_are_4xx_with_a_message(server, body, match):
    status, out = post(server, body)
    assert status == 400 and match in out["error"]["message"], out
    assert out["error"]["type"] == "invalid_request_error" and "Traceback" not in json.dumps(out)


def test_other_bad_requests(server, client):
    status, out = post(server, None, raw=b"{not json")
    assert status == 400 and "not JSON" in out["error"]["message"]
    status, out = post(server, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and out["error"]["code"] == "model_not_found"
    import http.client  # a body announced over the limit is refused before it is read
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(3 << 20))
    conn.endheaders()
    conn.send(b'{"model": "tiny", "pad": "')                    # the rest never comes: no need to read it
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    assert resp.status == 413 and "max-request-bytes" in out["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="must be a non-empty list"):
        client.chat.completions.create(model=MODEL, messages=[])
    status, out = post(server, {}, path="/v1/nothing")
    assert status == 404 and "error" in out


def test_concurrent_requests_are_batched_and_equal_sequential(client, pipe, server):
    """32 requests at once (greedy, images or not, different max_tokens) give their sequential outputs, and the
    server decoded them in batches of more than one."""
    questions = [(make_sample(i).question, make_sample(i).image() if i % 2 else None, 6 + i % 5) for i in range(32)]
    want = [client.chat.completions.create(model=MODEL, messages=ask(q, img), max_tokens=n).choices[0].message.content
            for q, img, n in questions]
    before = server.server.config.app.state.metrics.batch.count

    def one(i):
        q, img, n = questions[i]
        return client.chat.completions.create(model=MODEL, messages=ask(q, img), max_tokens=n).choices[0]\
            .message.content

    assert concurrently(one, len(questions)) == want
    m = server.server.config.app.state.metrics
    assert m.batch.count - before < len(questions)                      # some requests shared a batch


def test_overload_answers_429_and_a_disconnect_frees_its_place(pipe):
    """max_queue 1, max_batch 1: while one request decodes and one waits, a third is refused with 429; a waiting
    client that disconnects frees its place for the next one."""
    with Server(pipe, ServeOptions(port=0, max_batch=1, max_queue=1, model_name=MODEL), MODEL) as s:
        long = {"model": MODEL, "messages": [{"role": "user", "content": "Describe the picture."}],
                "max_tokens": 990, "stream": True}
        busy = urllib.request.urlopen(urllib.request.Request(
            s.url + "/v1/chat/completions", data=json.dumps(long).encode(),
            headers={"Content-Type": "application/json"}), timeout=60)
        busy.readline()                                                  # decoding has started
        waiting = urllib.request.urlopen(urllib.request.Request(
            s.url + "/v1/chat/completions", data=json.dumps(long).encode(),
            headers={"Content-Type": "application/json"}), timeout=60)   # queued behind it
        deadline = time.time() + 10
        while s.server.config.app.state.metrics.queue_depth < 1 and time.time() < deadline:
            time.sleep(0.01)
        status, out = post(s, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 429 and out["error"]["code"] == "queue_full"
        waiting.close()                                                  # the waiting client goes away
        m = s.server.config.app.state.metrics
        deadline = time.time() + 10
        while m.queue_depth > 0 and time.time() < deadline:
            time.sleep(0.02)
        assert m.queue_depth == 0 and m.running == 1             # freed while the first one still decodes
        ok = []
        t = threading.Thread(target=lambda: ok.append(post(s, {"model": MODEL, "messages": [
            {"role": "user", "content": "hi"}], "max_tokens": 2})))
        t.start()
        busy.close()                                                     # the decoding client goes away too
        t.join(timeout=60)
        assert ok and ok[0][0] == 200, ok


def test_metrics_parse(server, client):
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            assert line.startswith(("# HELP ", "# TYPE ")) or not line.strip()
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)                                     # every sample is a number
    assert samples['bard_requests_total{status="200"}'] >= 1 and samples["bard_generated_tokens_total"] >= 4
    assert samples['bard_batch_size_bucket{le="+Inf"}'] == samples["bard_batch_size_count"] >= 1
    assert samples["bard_step_seconds_count"] > 0 and "bard_queue_depth" in samples
    assert samples["bard_tokens_per_forward"] > 0


def test_a_speculative_request_gives_the_sources_greedy_answer(pipe, tmp_path):
    """speculative=source as an extra field: the server's pipeline verifies with the AR source it was given."""
    from bard_deploy.embedded import new_checkpoint as make

    ar_dir = make(tmp_path / "ar", seed=1, hidden=64, layers=2)
    b_dir = make(tmp_path / "b4", seed=2, bard={"block_size": 4}, hidden=64, layers=2)
    want = Pipeline.load(ar_dir).generate("Describe the picture.", ar=True, max_new_tokens=10).text
    with Server(Pipeline.load(b_dir, verifier=ar_dir), ServeOptions(port=0, model_name=MODEL), MODEL) as s:
        status, out = post(s, {"model": MODEL, "messages": [{"role": "user", "content": "Describe the picture."}],
                               "max_tokens": 10, "speculative": "source"})
        assert status == 200 and out["choices"][0]["message"]["content"] == want
        status, out = post(s, {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                               "speculative": "self"})
        assert status == 400 and "dual-mode" in out["error"]["message"]
