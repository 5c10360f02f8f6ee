"""``mtbi-fast serve``: an OpenAI-compatible chat-completions server for a trained speech LLM.

    mtbi-fast serve runs/my-run --port 8000        # or an exported folder (mtbi-fast export)

``POST /v1/chat/completions`` takes OpenAI's audio input: one user message whose content holds
text parts and exactly one ``{"type": "input_audio", "input_audio": {"data": <base64 WAV/FLAC/OGG>,
"format": "wav"}}`` part; the speech goes where the audio part stands among the text parts.
``"stream": true`` streams the answer as server-sent events (``chat.completion.chunk``s, then
``data: [DONE]``). ``GET /v1/models`` lists the model, ``GET /health`` answers when it is loaded.

Requests that arrive together are decoded together: one worker thread owns the model and takes up
to ``max_batch`` waiting non-streaming requests per ``generate`` call (left-padded, each clip
encoded at its own length); a streaming request is decoded alone. A malformed request, bad base64,
undecodable audio or a clip over the model's length limit is a 4xx answer naming the problem
(OpenAI's error body: ``{"error": {"message", "type", "param"}}``).
"""


import base64
import binascii
import contextlib
import io
import json
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .prompts import SPEECH

MAX_AUDIO_BYTES = 32 * 2**20  # a base64 clip larger than this is refused before decoding
DEFAULT_MAX_TOKENS = 128


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with a message naming the field."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# ---------------------------------------------------------------------------------------------
# the model


class Backend:
    """A model folder behind one interface: a run folder or ``save_pretrained`` folder (mtbi-fast's
    ``SpeechLLM``), or an exported folder (transformers ``AutoModel``, remote code)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        from .export import model_folder

        source = model_folder(folder)
        config_path = source / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} is not a model folder (no config.json; pass a run folder, "
                                    f"a save_pretrained folder or an exported one)")
        config = json.loads(config_path.read_text())
        self.name = folder.resolve().name
        self.exported = config.get("model_type") == "mtbi_speech"
        if self.exported:
            from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

            self.model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
            self.features = AutoFeatureExtractor.from_pretrained(source)
            self.max_seconds = float(self.model.config.max_audio_seconds)
        else:
            from .model import SpeechLLM

            self.model = SpeechLLM.from_pretrained(source).eval()
            self.tokenizer = self.model.tokenizer
            self.max_seconds = float(self.model.max_seconds)

    def check_prompt(self, prompt: str) -> None:
        from .prompts import prompt_halves

        prompt_halves(self.tokenizer, prompt)

    def answer(self, waves: list, prompts: list[str], max_new_tokens: int, streamer=None) -> list[str]:
        if self.exported:
            kw = {"streamer": streamer} if streamer is not None else {}
            return self.model.answer([w.numpy() for w in waves], prompts, self.tokenizer, self.features,
                                     max_new_tokens=max_new_tokens, **kw)
        return self.model.generate_batch(waves, prompts, streamer=streamer, max_new_tokens=max_new_tokens)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# requests


@dataclass
class Job:
    wave: object
    prompt: str
    max_tokens: int
    stream: bool
    done: threading.Event = field(default_factory=threading.Event)
    answer: str | None = None
    error: BaseException | None = None
    streamer: object = None


def parse_request(body: dict, max_seconds: float) -> tuple[object, str, int, bool]:
    """(16 kHz waveform, prompt with ``{speech}``, max_tokens, stream) from a chat-completions
    body; ``RequestError`` naming the field otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list", param="messages")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    others = [m for m in messages if not (isinstance(m, dict) and m.get("role") in ("user", "system"))]
    if len(users) != 1 or others:
        raise RequestError("one user message (and optionally system messages) is supported: the model "
                           "answers a single prompt about one clip", param="messages")
    content = users[0].get("content")
    if isinstance(content, str) or not isinstance(content, list):
        raise RequestError("the user message's content must be a list of parts with one input_audio part",
                           param="messages[].content")
    texts, wave = [], None
    for i, part in enumerate(content):
        where = f"messages[].content[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{where}.text must be a string", param=where)
            if SPEECH in part["text"]:
                raise RequestError(f"{where}.text must not hold {SPEECH}: the input_audio part marks "
                                   f"where the speech goes", param=where)
            texts.append(part["text"])
        elif kind == "input_audio":
            if wave is not None:
                raise RequestError("only one input_audio part is supported", param=where)
            wave = decode_audio(part.get("input_audio"), where, max_seconds)
            texts.append(SPEECH)
        else:
            raise RequestError(f"{where}.type must be text or input_audio, got {kind!r}", param=where)
    if wave is None:
        raise RequestError("the user message has no input_audio part", param="messages[].content")
    prompt = " ".join(t.strip() for t in texts if t.strip())
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= 4096:
        raise RequestError(f"max_tokens must be an integer from 1 to 4096, got {max_tokens!r}",
                           param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", param="stream")
    return wave, prompt, max_tokens, stream


def decode_audio(audio, where: str, max_seconds: float):
    """An ``input_audio`` object -> a mono 16 kHz float32 waveform, or ``RequestError``."""
    import soundfile as sf

    from .audio import wave_from_samples

    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str):
        raise RequestError(f"{where}.input_audio must be an object with base64 data", param=where)
    fmt = audio.get("format", "wav")
    if fmt not in ("wav", "flac", "ogg"):
        raise RequestError(f"{where}.input_audio.format must be wav, flac or ogg, got {fmt!r}", param=where)
    if len(audio["data"]) > MAX_AUDIO_BYTES * 4 // 3 + 4:
        raise RequestError(f"{where}.input_audio.data is over {MAX_AUDIO_BYTES // 2**20} MiB", status=413,
                           param=where)
    try:
        raw = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}.input_audio.data is not valid base64", param=where) from None
    try:
        data, rate = sf.read(io.BytesIO(raw), dtype="float32", always_2d=True)
    except Exception as exc:  # noqa: BLE001 - soundfile raises several types
        reason = re.sub(r"^Error opening <[^>]*>: ", "", str(exc)).strip()  # not the buffer's repr
        raise RequestError(f"{where}.input_audio.data is not a readable {fmt} file ({reason})", param=where) from None
    seconds = data.shape[0] / rate if rate else 0.0
    if seconds > max_seconds:
        raise RequestError(f"{where}: the clip is {seconds:.2f} s long, over the model's limit of "
                           f"{max_seconds:g} s", status=413, param=where)
    try:
        return wave_from_samples(data, rate, f"{where}.input_audio")
    except ValueError as exc:
        raise RequestError(str(exc), param=where) from None


# ---------------------------------------------------------------------------------------------
# the worker that owns the model


class Worker:
    """One thread runs the model: non-streaming jobs that are waiting together with the same
    token limit are decoded in one batch (up to ``max_batch``), a streaming job alone."""

    def __init__(self, backend: Backend, max_batch: int = 8):
        self.backend, self.max_batch = backend, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.batches: list[int] = []  # the size of every batch run (for tests and the log)
        self.thread = threading.Thread(target=self._run, name="mtbi-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        self.jobs.put(job)
        return job

    def _run(self):
        pending: list[Job] = []  # taken from the queue, not yet decoded (in arrival order)
        while True:
            if not pending:
                job = self.jobs.get()
                if job is None:
                    return
                pending.append(job)
            while True:  # whatever else has arrived meanwhile
                try:
                    job = self.jobs.get(timeout=0.005)
                except queue.Empty:
                    break
                if job is None:
                    return
                pending.append(job)
            first = pending[0]
            if first.stream:
                group = [first]
            else:  # waiting non-streaming jobs with the same token limit, in arrival order
                group = [j for j in pending if not j.stream and j.max_tokens == first.max_tokens][: self.max_batch]
            pending = [j for j in pending if all(j is not g for g in group)]
            self._decode(group)

    def _decode(self, group: list[Job]):
        self.batches.append(len(group))
        try:
            answers = self.backend.answer([j.wave for j in group], [j.prompt for j in group],
                                          max(j.max_tokens for j in group),
                                          streamer=group[0].streamer if group[0].stream else None)
            for job, text in zip(group, answers):
                job.answer = text.strip() if not job.stream else text
        except BaseException as exc:  # noqa: BLE001 - the request gets the error, the worker lives
            for job in group:
                job.error = exc
            if group[0].streamer is not None:
                group[0].streamer.end()
        finally:
            for job in group:
                job.done.set()

    def stop(self):
        self.jobs.put(None)


# ---------------------------------------------------------------------------------------------
# the HTTP application


def create_app(backend: Backend, max_batch: int = 8):
    """The FastAPI application serving ``backend``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    worker = Worker(backend, max_batch=max_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.stop()

    app = FastAPI(title="mtbi-fast", description="OpenAI-compatible chat completions with audio input",
                  lifespan=lifespan)
    app.state.worker = worker
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                            status_code=status)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": backend.name}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": backend.name, "object": "model", "created": created,
                                            "owned_by": "mtbi-fast"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
            return error(400, "the request body is not valid JSON")
        try:
            wave, prompt, max_tokens, stream = parse_request(body, backend.max_seconds)
            backend.check_prompt(prompt)
        except RequestError as exc:
            return error(exc.status, str(exc), exc.param)
        except ValueError as exc:  # the prompt does not fit the chat template
            return error(400, str(exc), "messages")
        job = Job(wave=wave, prompt=prompt, max_tokens=max_tokens, stream=stream)
        ident, model_name = f"chatcmpl-{uuid.uuid4().hex[:24]}", body.get("model") or backend.name
        if stream:
            from transformers import TextIteratorStreamer

            job.streamer = TextIteratorStreamer(backend.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                                timeout=600)
            worker.submit(job)
            return StreamingResponse(_events(job, ident, model_name), media_type="text/event-stream")
        worker.submit(job)
        import anyio

        await anyio.to_thread.run_sync(job.done.wait)
        if job.error is not None:
            status = 400 if isinstance(job.error, ValueError) else 500
            return error(status, f"{type(job.error).__name__}: {job.error}")
        completion = backend.count_tokens(job.answer)
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.answer},
                             "finish_reason": "length" if completion >= max_tokens else "stop"}],
                "usage": {"prompt_tokens": None, "completion_tokens": completion, "total_tokens": None}}

    return app


def _events(job: Job, ident: str, model_name: str):
    """The server-sent events of a streaming answer."""
    def chunk(delta: dict, finish: str | None = None) -> str:
        return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": int(time.time()),
                                      "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                        "finish_reason": finish}]}) + "\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in job.streamer:
        if piece:
            yield chunk({"content": piece})
    job.done.wait()
    if job.error is not None:
        yield "data: " + json.dumps({"error": {"message": f"{type(job.error).__name__}: {job.error}",
                                               "type": "server_error"}}) + "\n\n"
    else:
        yield chunk({}, "stop")
    yield "data: [DONE]\n\n"


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8) -> None:
    """Load the model in ``folder`` and serve it until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ImportError("mtbi-fast serve needs fastapi and uvicorn: pip install -e '.[serve]'") from None
    if max_batch < 1:
        raise ValueError(f"--max-batch must be at least 1, got {max_batch}")
    start = time.time()
    backend = Backend(folder)
    print(f"loaded {folder} ({'exported' if backend.exported else 'mtbi-fast'} model, max {backend.max_seconds:g} s "
          f"of audio) in {time.time() - start:.1f} s; serving http://{host}:{port}/v1/chat/completions", flush=True)
    uvicorn.run(create_app(backend, max_batch=max_batch), host=host, port=port, log_level="info")
