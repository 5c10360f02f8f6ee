"""``mtbi-fast serve`` (mtbi_fast/serve.py): a real HTTP client against a uvicorn server on
localhost gets ``mtbi-fast infer``'s answer; concurrent requests all succeed (and are batched);
bad audio is a 4xx naming the problem."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from mtbi_fast.cli import main as cli

from helpers import CONFIG, ROOT, overrides

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

CLIP = ROOT / "tests" / "data" / "clip1.flac"
PROMPT_TEXT = "Repeat what you hear:"
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "run"
    assert cli(["train", str(CONFIG), *overrides(data, out, "train.steps=3", "train.eval_every=100",
                                                 "train.save_every=100", "model.dtype=float32")]) == 0
    return out


def start(folder, max_batch=8):
    from mtbi_fast.serve import Backend, create_app

    app = create_app(Backend(folder), max_batch=max_batch)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", app


@pytest.fixture(scope="module")
def server(run):
    srv, thread, url, app = start(run)
    yield url, app
    srv.should_exit = True
    thread.join(timeout=30)


def wav_b64(path=CLIP, seconds=None) -> str:
    import soundfile as sf

    if seconds is not None:
        wave, rate = np.zeros(int(16000 * seconds), dtype=np.float32), 16000
    else:
        wave, rate = sf.read(str(path), dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def body(audio=None, text=PROMPT_TEXT, **extra) -> dict:
    content = [{"type": "text", "text": text},
               {"type": "input_audio", "input_audio": {"data": audio or wav_b64(), "format": "wav"}}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}],
            "max_tokens": NEW_TOKENS, **extra}


def post(url, payload, raw: bytes | None = None):
    req = urllib.request.Request(url + "/v1/chat/completions", data=raw or json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def infer_answer(run, capsys) -> str:
    capsys.readouterr()
    # the server puts the speech where the audio part stands: after the text, as "{speech}" here
    assert cli(["infer", "--model", str(run), "--audio", str(CLIP), "--prompt", PROMPT_TEXT + " {speech}",
                "--no-stream", "--max-new-tokens", str(NEW_TOKENS)]) == 0
    return capsys.readouterr().out.split("\n", 1)[1].strip()


def test_a_request_gets_infers_answer(server, run, capsys):
    url, _ = server
    status, text = post(url, body())
    assert status == 200, text
    reply = json.loads(text)
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["choices"][0]["message"]["content"] == infer_answer(run, capsys)
    assert reply["usage"]["completion_tokens"] >= 1
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        assert json.loads(r.read())["data"][0]["id"] == run.name


def test_streaming_sends_the_same_answer_in_chunks(server, run, capsys):
    url, _ = server
    status, text = post(url, body(stream=True))
    assert status == 200, text
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed.strip() == infer_answer(run, capsys)


def test_concurrent_requests_all_succeed_and_are_batched(server):
    url, app = server
    app.state.worker.batches.clear()
    results = [None] * 4
    barrier = threading.Barrier(4)

    def ask(i):
        barrier.wait()
        results[i] = post(url, body())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None and r[0] == 200 for r in results), results
    answers = {json.loads(r[1])["choices"][0]["message"]["content"] for r in results}
    assert len(answers) == 1  # the same prompt and clip: the same answer, batched or not
    assert sum(app.state.worker.batches) == 4 and max(app.state.worker.batches) >= 2


@pytest.mark.parametrize("payload, raw, status, message", [
    (None, b"{not json", 400, "not valid JSON"),
    ({"messages": []}, None, 400, "messages must be a non-empty list"),
    ("no-audio", None, 400, "has no input_audio part"),
    ("bad-b64", None, 400, "input_audio.data is not valid base64"),
    ("not-audio", None, 400, "is not a readable wav file"),
    ("too-long", None, 413, "over the model's limit of 30 s"),
    ("bad-tokens", None, 400, "max_tokens must be an integer from 1 to 4096"),
    ("marker", None, 400, "must not hold {speech}"),
], ids=["json", "messages", "no-audio", "base64", "not-audio", "too-long", "max-tokens", "marker"])
def test_bad_requests_get_a_4xx_naming_the_problem(server, payload, raw, status, message):
    url, _ = server
    if payload == "no-audio":
        payload = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    elif payload == "bad-b64":
        payload = body(audio="@@@not base64@@@")
    elif payload == "not-audio":
        payload = body(audio=base64.b64encode(b"RIFF0000 definitely not a wav file").decode())
    elif payload == "too-long":
        payload = body(audio=wav_b64(seconds=31))
    elif payload == "bad-tokens":
        payload = body(max_tokens=0)
    elif payload == "marker":
        payload = body(text="Say {speech}")
    got, text = post(url, payload, raw)
    assert got == status, text
    assert message in json.loads(text)["error"]["message"], text
    assert post(url, body())[0] == 200  # the server still answers


def test_an_exported_folder_serves_the_same_answer(run, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert cli(["export", str(run), "-o", str(folder)]) == 0
    srv, thread, url, _ = start(folder)
    try:
        status, text = post(url, body())
        assert status == 200, text
        assert json.loads(text)["choices"][0]["message"]["content"] == infer_answer(run, capsys)
        status, text = post(url, body(audio=wav_b64(seconds=31)))
        assert status == 413 and "over the model's limit of 30 s" in text
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
