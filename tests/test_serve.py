"""mxc-serve through the official `openai` client against a server on 127.0.0.1 (in a thread of this
process) serving the demo model: every answer must equal what `model.chat` returns for the same
conversation and decoding arguments, and every bad request must get a 4xx with OpenAI's error body.

The reference `model.chat` calls run only while the server is idle: the server's model thread and the
test share one model object."""
import base64
import concurrent.futures as cf
import contextlib
import functools
import http.server
import json
import os
import shutil
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import ServerThread  # noqa: E402

from mindxcomposer.serve import create_app, make_engine  # noqa: E402
from mindxcomposer.serve.media import MediaPolicy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CAT = os.path.join(HERE, "assets", "chelsea_tiny.png")
STRIP = os.path.join(HERE, "assets", "rocket_strip_8x1.png")
VIDEO = os.path.join(HERE, "fixtures", "chat", "square_1fps.avi")
NAME = "ixc-demo"


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text):
    return {"type": "text", "text": text}


@pytest.fixture(scope="module")
def allowed_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    shutil.copy(CAT, d / "cat.png")
    shutil.copy(VIDEO, d / "clip.avi")
    return d


@pytest.fixture(scope="module", params=["serial", "batch"])
def server(request, demo_model, allowed_dir):
    engine = make_engine(demo_model, max_batch=1 if request.param == "serial" else 4, max_queue=8).start()
    app = create_app(demo_model, engine, NAME, MediaPolicy([str(allowed_dir)], max_bytes=200_000))
    with ServerThread(app) as srv:
        srv.engine = engine
        yield srv
    engine.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **kw)


def chat(model, query, **kw):
    return model.chat(model.tokenizer, query, **kw)[0]


GREEDY = dict(temperature=0, max_tokens=8)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_plain_text_equals_chat(client, demo_model):
    r = ask(client, [{"role": "user", "content": "Hello, who are you?"}], **GREEDY)
    assert r.choices[0].message.content == chat(demo_model, "Hello, who are you?", max_new_tokens=8, do_sample=False)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8
    n_prompt = demo_model.interleav_wrap_chat("Hello, who are you?", [])[0]["inputs_embeds"].shape[1]
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.total_tokens == n_prompt + 8


def test_streamed_equals_plain_and_chat(client, demo_model):
    msgs = [{"role": "user", "content": [image_part(data_url(CAT)), text_part("What is in the image?")]}]
    chunks = list(ask(client, msgs, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    plain = ask(client, msgs, **GREEDY).choices[0].message.content
    expected = chat(demo_model, "<ImageHere>What is in the image?", image=[CAT], max_new_tokens=8, do_sample=False)
    assert text == plain == expected


def test_sse_wire_format_ends_with_done(server):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True, "temperature": 0,
            "max_tokens": 3}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_multi_image_placed_where_parts_are(client, demo_model):
    msgs = [{"role": "user", "content": [text_part("First "), image_part(data_url(CAT)), text_part(" then "),
                                         image_part(data_url(STRIP)), text_part(" compare them.")]}]
    r = ask(client, msgs, **GREEDY)
    expected = chat(demo_model, "First <ImageHere> then <ImageHere> compare them.", image=[CAT, STRIP],
                    max_new_tokens=8, do_sample=False)
    assert r.choices[0].message.content == expected


def test_markers_in_text_are_kept_and_filled_in_order(client, demo_model):
    query = "Image1 <ImageHere>; Image2 <ImageHere>; which is larger?"
    msgs = [{"role": "user", "content": [image_part(data_url(STRIP)), image_part(data_url(CAT)), text_part(query)]}]
    r = ask(client, msgs, **GREEDY)
    assert r.choices[0].message.content == chat(demo_model, query, image=[STRIP, CAT], max_new_tokens=8,
                                                do_sample=False)


def test_system_prompt_and_history(client, demo_model):
    msgs = [{"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": [image_part(data_url(CAT)), text_part("Describe it.")]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "What colour is it?"}]
    r = ask(client, msgs, **GREEDY)
    expected = chat(demo_model, "What colour is it?", image=[CAT], history=[("<ImageHere>Describe it.", "A cat.")],
                    use_meta=True, meta_instruction="You are a terse assistant.", max_new_tokens=8, do_sample=False)
    assert r.choices[0].message.content == expected
    without = ask(client, msgs[1:], **GREEDY).choices[0].message.content
    assert without == chat(demo_model, "What colour is it?", image=[CAT], max_new_tokens=8, do_sample=False,
                           history=[("<ImageHere>Describe it.", "A cat.")])


def test_sampling_with_seed_and_ixc_parameters(client, demo_model):
    r = ask(client, [{"role": "user", "content": "Tell me a story."}], temperature=0.7, top_p=0.9, seed=11,
            max_tokens=8, extra_body={"top_k": 20, "repetition_penalty": 1.2})
    expected = chat(demo_model, "Tell me a story.", do_sample=True, temperature=0.7, top_p=0.9, top_k=20, seed=11,
                    repetition_penalty=1.2, max_new_tokens=8)
    assert r.choices[0].message.content == expected
    beams = ask(client, [{"role": "user", "content": "Tell me a story."}], extra_body={"num_beams": 2}, **GREEDY)
    assert beams.choices[0].message.content == chat(demo_model, "Tell me a story.", num_beams=2, do_sample=False,
                                                    max_new_tokens=8)


def test_stop_strings_cut_the_answer(client, demo_model):
    full = chat(demo_model, "Count with me.", max_new_tokens=12, do_sample=False)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip(), full
    for stream in (False, True):
        r = ask(client, [{"role": "user", "content": "Count with me."}], stop=[stop], stream=stream,
                temperature=0, max_tokens=12)
        text = (r.choices[0].message.content if not stream
                else "".join(c.choices[0].delta.content or "" for c in r if c.choices))
        assert text == full[:full.find(stop)]


def test_local_file_under_allowed_dir(client, demo_model, allowed_dir):
    path = str(allowed_dir / "cat.png")
    for url in (path, "file://" + path):
        r = ask(client, [{"role": "user", "content": [image_part(url), text_part("What is it?")]}], **GREEDY)
        assert r.choices[0].message.content == chat(demo_model, "<ImageHere>What is it?", image=[CAT],
                                                    max_new_tokens=8, do_sample=False)


def test_video_path_as_a_part(client, demo_model, allowed_dir):
    path = str(allowed_dir / "clip.avi")
    for part in ({"type": "video_url", "video_url": {"url": path}}, image_part("file://" + path)):
        r = ask(client, [{"role": "user", "content": [part, text_part("What happens?")]}], **GREEDY)
        assert r.choices[0].message.content == chat(demo_model, "<ImageHere>What happens?", image=[VIDEO],
                                                    max_new_tokens=8, do_sample=False)


def test_a_directory_as_a_part_is_named(client, allowed_dir):
    folder = allowed_dir / "photos.png"
    folder.mkdir(exist_ok=True)
    with pytest.raises(openai.BadRequestError, match="is a directory"):
        ask(client, [{"role": "user", "content": [image_part(str(folder)), text_part("x")]}], **GREEDY)


class _ImageHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_image_fetched_with_size_cap(client, demo_model):
    handler = functools.partial(_ImageHandler, directory=os.path.join(HERE, "assets"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        r = ask(client, [{"role": "user", "content": [image_part(base + "/chelsea_tiny.png"), text_part("Hi")]}],
                **GREEDY)
        assert r.choices[0].message.content == chat(demo_model, "<ImageHere>Hi", image=[CAT], max_new_tokens=8,
                                                    do_sample=False)
        with pytest.raises(openai.BadRequestError, match="larger than"):  # 218 kB > the 200 kB cap
            ask(client, [{"role": "user", "content": [image_part(base + "/chelsea.png"), text_part("Hi")]}], **GREEDY)
        with pytest.raises(openai.BadRequestError, match="HTTP 404"):
            ask(client, [{"role": "user", "content": [image_part(base + "/missing.png"), text_part("Hi")]}], **GREEDY)
    finally:
        httpd.shutdown()


def _bad(kind, text, **overrides):
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body.update(overrides)
    return pytest.param(body, text, id=kind)


BAD_REQUESTS = [
    _bad("bad-base64", "invalid base64", messages=[{"role": "user", "content": [
        image_part("data:image/png;base64,@@@not-base64@@@"), text_part("x")]}]),
    _bad("undecodable-image", "cannot decode the image", messages=[{"role": "user", "content": [
        image_part("data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()), text_part("x")]}]),
    _bad("marker-mismatch", "marker", messages=[{"role": "user", "content": [
        image_part(data_url(CAT)), text_part("<ImageHere> and <ImageHere>")]}]),
    _bad("too-long", "max_length", messages=[{"role": "user", "content": "word " * 5000}]),
    _bad("too-long-with-max-tokens", "max_tokens", max_tokens=6000),
    _bad("local-path-outside", "outside the allowed", messages=[{"role": "user", "content": [
        image_part(CAT), text_part("x")]}]),
    _bad("unsupported-scheme", "scheme", messages=[{"role": "user", "content": [
        image_part("ftp://127.0.0.1/x.png"), text_part("x")]}]),
    _bad("negative-temperature", "temperature", temperature=-1),
    _bad("top-p", "top_p", top_p=1.5),
    _bad("n", "n=1", n=2),
    _bad("max-tokens-zero", "max_tokens", max_tokens=0),
    _bad("max-tokens-type", "max_tokens", max_tokens="many"),
    _bad("num-beams", "num_beams", num_beams=0),
    _bad("infer-mode", "infer_mode", infer_mode="poetry"),
    _bad("repetition-penalty", "repetition_penalty", repetition_penalty=0),
    _bad("hd-num", "hd_num", hd_num=0),
    _bad("seed", "seed", seed="abc"),
    _bad("stop", "stop", stop=["a", "b", "c", "d", "e"]),
    _bad("logprobs", "logprobs", logprobs=True),
    _bad("stream-type", "stream", stream="yes"),
    _bad("no-messages", "messages", messages=[]),
    _bad("ends-with-assistant", "last message", messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
    _bad("two-users", "alternate", messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
    _bad("bad-role", "role", messages=[{"role": "robot", "content": "a"}]),
    _bad("bad-part", "content part", messages=[{"role": "user", "content": [{"type": "audio"}]}]),
    _bad("image-in-assistant", "only user", messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": [image_part(data_url(CAT))]},
        {"role": "user", "content": "b"}]),
    _bad("no-model", "model", model=None),
]


@pytest.mark.parametrize("body,text", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(server, client, body, text):
    body = dict(body)  # the parameter is shared by both engines' runs
    own = {k: body.pop(k) for k in ("num_beams", "infer_mode", "repetition_penalty", "hd_num") if k in body}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body, extra_body=own)
    assert e.value.status_code == 400
    err = e.value.body
    assert set(err) >= {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert text in err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_malformed_json_and_unknown_model(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "object" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    assert httpx.get(server.url + "/nowhere").json()["error"]["type"] == "invalid_request_error"


def test_oversized_body_is_refused(demo_model):
    engine = make_engine(demo_model, max_batch=1).start()
    try:
        with ServerThread(create_app(demo_model, engine, NAME, max_body_bytes=10_000)) as srv:
            body = {"model": NAME, "messages": [{"role": "user", "content": [image_part(data_url(STRIP))]}]}
            r = httpx.post(srv.url + "/v1/chat/completions", json=body)
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
            assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        engine.stop()


def test_concurrent_requests_each_equal_chat_alone(server, client, demo_model):
    cases = [("Hello!", [], 6), ("What is this?", [CAT], 9), ("Compare.", [CAT, STRIP], 4), ("Why?", [], 12),
             ("Once more.", [STRIP], 7)]

    def one(case):
        q, images, k = case
        content = [image_part(data_url(p)) for p in images] + [text_part(q)]
        return ask(client, [{"role": "user", "content": content}], temperature=0, max_tokens=k).choices[0]

    with cf.ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(one, cases))
    for (q, images, k), choice in zip(cases, got):
        expected = chat(demo_model, "<ImageHere>" * len(images) + q, image=images, max_new_tokens=k, do_sample=False)
        assert choice.message.content == expected, q
    if server.engine.max_batch > 1:
        assert server.engine.max_rows > 1  # they did share steps


@contextlib.contextmanager
def serving(model, timeout=None, **engine_kw):
    engine = make_engine(model, **engine_kw).start()
    try:
        with ServerThread(create_app(model, engine, NAME, timeout=timeout)) as srv:
            srv.engine = engine
            yield srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        engine.stop()


def test_requests_join_a_running_batch_and_stay_exact(demo_model):
    """A long request decodes while others arrive, join it at step boundaries (sampled, beams, images) and
    leave; each answer equals chat alone."""
    long_q, k_long = "Write a long story about the sea.", 200
    cases = [dict(q="Hi!", images=[CAT], kw=dict(temperature=0, max_tokens=5), ref=dict(do_sample=False)),
             dict(q="Sample.", images=[], kw=dict(temperature=0.8, seed=5, max_tokens=9),
                  ref=dict(do_sample=True, temperature=0.8, seed=5)),
             dict(q="Beams.", images=[], kw=dict(temperature=0, max_tokens=6, extra_body={"num_beams": 2}),
                  ref=dict(do_sample=False, num_beams=2))]
    with serving(demo_model, max_batch=4, max_queue=8) as (srv, client):
        with cf.ThreadPoolExecutor(4) as pool:
            first = pool.submit(ask, client, [{"role": "user", "content": long_q}], temperature=0, max_tokens=k_long,
                                stream=True)
            stream = first.result()
            head = [next(stream) for _ in range(4)]  # the long request is decoding now
            steps_before = srv.engine.steps
            contents = [[image_part(data_url(p)) for p in c["images"]] + [text_part(c["q"])] for c in cases]
            others = [pool.submit(ask, client, [{"role": "user", "content": content}], **c["kw"])
                      for c, content in zip(cases, contents)]
            got = [f.result().choices[0].message.content for f in others]
            rest = list(stream)
        assert srv.engine.steps > steps_before and srv.engine.max_rows >= 2
        assert srv.engine.joins >= len(cases)  # each newcomer joined a batch that was decoding
        long_text = "".join(c.choices[0].delta.content or "" for c in head + rest if c.choices)
    assert long_text == chat(demo_model, long_q, max_new_tokens=k_long, do_sample=False)
    for c, text in zip(cases, got):
        expected = chat(demo_model, "<ImageHere>" * len(c["images"]) + c["q"], image=c["images"],
                        max_new_tokens=c["kw"]["max_tokens"], **c["ref"])
        assert text == expected, c["q"]


def test_running_decodes_step_between_the_chunks_of_a_long_prefill(demo_model):
    long_prompt = "Read this: " + " ".join(f"item{i}" for i in range(700))  # > 2 prefill chunks
    with serving(demo_model, max_batch=2, max_queue=4) as (srv, client):
        with cf.ThreadPoolExecutor(2) as pool:
            stream = ask(client, [{"role": "user", "content": "Keep talking."}], temperature=0, max_tokens=300,
                         stream=True)
            head = [next(stream) for _ in range(3)]
            newcomer = pool.submit(ask, client, [{"role": "user", "content": long_prompt}], **GREEDY)
            rest = list(stream)
            text = newcomer.result().choices[0].message.content
        assert srv.engine.steps_in_prefill >= 2
    assert "".join(c.choices[0].delta.content or "" for c in head + rest if c.choices) == \
        chat(demo_model, "Keep talking.", max_new_tokens=300, do_sample=False)
    assert text == chat(demo_model, long_prompt, max_new_tokens=8, do_sample=False)


def test_full_queue_answers_429_and_recovers(demo_model):
    with serving(demo_model, max_batch=2, max_queue=1) as (srv, client):
        def one(i):
            try:
                return ask(client, [{"role": "user", "content": f"Story {i}"}], temperature=0, max_tokens=150)
            except openai.RateLimitError as e:
                return e

        with cf.ThreadPoolExecutor(10) as pool:  # 2 rows + 1 queued: most of the 10 find no room
            results = list(pool.map(one, range(10)))
        limited = [r for r in results if isinstance(r, openai.RateLimitError)]
        assert limited and all(r.status_code == 429 and r.body["code"] == "queue_full" for r in limited)
        assert any(not isinstance(r, Exception) for r in results)
        assert ask(client, [{"role": "user", "content": "Again"}], **GREEDY).choices[0].message.content


def test_timeout_abandons_the_request(demo_model):
    with serving(demo_model, timeout=0.5, max_batch=2, max_queue=4) as (srv, client):
        with pytest.raises(openai.APIStatusError) as e:
            ask(client, [{"role": "user", "content": "Never ending"}], temperature=0, max_tokens=3000)
        assert e.value.status_code == 408 and e.value.body["code"] == "request_timeout"
        _wait_idle(srv.engine)


def _wait_idle(engine, seconds=20):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not engine.active and len(engine.free_rows) == engine.max_batch:
            return
        time.sleep(0.05)
    raise AssertionError("the engine did not free its rows")


def test_disconnect_frees_the_row(demo_model):
    with serving(demo_model, max_batch=2, max_queue=4) as (srv, client):
        body = {"model": NAME, "messages": [{"role": "user", "content": "Go on forever"}], "stream": True,
                "temperature": 0, "max_tokens": 3000}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
            assert srv.engine.active  # decoding
        started = time.monotonic()
        _wait_idle(srv.engine)
        assert time.monotonic() - started < 10
        steps = srv.engine.steps
        assert ask(client, [{"role": "user", "content": "Next"}], **GREEDY).choices[0].message.content
        assert srv.engine.steps - steps <= GREEDY["max_tokens"]  # the abandoned request no longer decodes
