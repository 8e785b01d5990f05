"""OpenAI Chat Completions requests -> what `model.chat` takes, with every check done up front.

`parse_chat_request(body)` validates the JSON body and returns a `ChatRequest`:
- the conversation: an optional first system (or developer) message becomes `meta_instruction` (with
  `use_meta=True`); user/assistant turns must alternate and end with a user turn; earlier pairs become
  `history`, the last user turn `query`;
- content is a string or a list of `text`, `image_url` and `video_url` parts. Text parts are joined as
  they are and each image part becomes an `<ImageHere>` where it stands, except that when a text of the
  conversation already holds `<ImageHere>` markers, image parts add none and the images fill the markers
  in order (so any upstream prompt can be sent exactly);
- decoding: `max_tokens` (or `max_completion_tokens`), `temperature` (0 = greedy), `top_p`, `top_k`,
  `seed`, `stop`, `n` = 1, and IXC's own `repetition_penalty`, `hd_num`, `num_beams`, `infer_mode`.
  What is absent takes `model.chat`'s default, so the same request means the same call.
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..constants import CHAT_DEFAULTS, INFER_MODES
from ..prompt import IMAGE_MARKER, META_INSTRUCTION
from .errors import APIError, bad_request

MAX_STOP = 4

# Known OpenAI fields this server cannot honour: a value other than "unset" is an error, never ignored.
_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []),
                "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
                "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
                "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}


@dataclass
class ImagePart:
    url: str
    where: str  # e.g. "messages[1].content[0]", for error messages


@dataclass
class ChatRequest:
    model: str
    query: str
    history: List[Tuple[str, str]]
    images: List[ImagePart]
    use_meta: bool
    meta_instruction: str
    stream: bool
    include_usage: bool
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    seed: Optional[int]
    stop: List[str]
    repetition_penalty: float
    hd_num: int
    num_beams: int
    infer_mode: str

    def chat_kwargs(self) -> dict:
        """Keyword arguments of `model.chat` (besides tokenizer, query, image, history, streamer) that
        decode this request."""
        kw = dict(hd_num=self.hd_num, max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                  num_beams=self.num_beams, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  repetition_penalty=self.repetition_penalty, infer_mode=self.infer_mode, use_meta=self.use_meta,
                  meta_instruction=self.meta_instruction)
        if self.seed is not None:
            kw["seed"] = self.seed
        return kw


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _int(body, name, default, lo=None, hi=None):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        raise bad_request(f"{name} must be an integer{rng}, got {v!r}", param=name, code="invalid_value")
    return v


def _number(body, name, default, check, what):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v) or not check(v):
        raise bad_request(f"{name} must be {what}, got {v!r}", param=name, code="invalid_value")
    return float(v)


def _content(msg, i: int, markers_mode: bool, images: List[ImagePart], allow_images: bool) -> str:
    """A message's content as prompt text; image parts are appended to `images`."""
    content = msg.get("content")
    where = f"messages[{i}].content"
    if isinstance(content, str):
        return content
    if content is None:
        raise bad_request(f"{where} is missing", param=where)
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts", param=where)
    text = ""
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(f"{pw} must be an object with a 'type'", param=pw)
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{pw}.text must be a string", param=pw)
            text += part["text"]
        elif kind in ("image_url", "video_url"):
            if not allow_images:
                raise bad_request(f"{pw}: only user messages may hold images", param=pw)
            ref = part.get(kind)
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad_request(f"{pw}.{kind}.url must be a non-empty string", param=pw)
            images.append(ImagePart(url, pw))  # the file's extension decides image or video
            if not markers_mode:
                text += IMAGE_MARKER
        else:
            raise bad_request(f"{pw}: unsupported content part type {kind!r} (text, image_url, video_url)", param=pw)
    return text


def _texts(messages) -> List[str]:
    out = []
    for m in messages:
        c = m.get("content") if isinstance(m, dict) else None
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out += [p.get("text") for p in c if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return out


def parse_conversation(messages) -> Tuple[str, List[Tuple[str, str]], List[ImagePart], bool, str]:
    """messages -> (query, history, images in prompt order, use_meta, meta_instruction)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}] must be an object", param=f"messages[{i}]")
    markers_mode = any(IMAGE_MARKER in t for t in _texts(messages))
    images: List[ImagePart] = []
    use_meta, meta = False, META_INSTRUCTION
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role in ("system", "developer"):
            if i != 0:
                raise bad_request(f"messages[{i}]: a system message may only come first", param=f"messages[{i}]")
            use_meta, meta = True, _content(m, i, markers_mode, images, allow_images=False)
        elif role in ("user", "assistant"):
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise bad_request(f"messages[{i}]: expected a {expected} message (user and assistant turns "
                                  f"alternate, starting with user), got {role}", param=f"messages[{i}]")
            turns.append(_content(m, i, markers_mode, images, allow_images=role == "user"))
        else:
            raise bad_request(f"messages[{i}]: unsupported role {role!r} (system, user, assistant)",
                              param=f"messages[{i}].role")
    if not turns or len(turns) % 2 == 0:
        raise bad_request("the last message must be a user message", param="messages")
    history = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    return turns[-1], history, images, use_meta, meta


def parse_chat_request(body, served_model: str, max_beams: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model must be a non-empty string", param="model")
    if model != served_model:
        raise APIError(f"The model {model!r} does not exist; this server serves {served_model!r}", 404,
                       "invalid_request_error", "model", "model_not_found")
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise bad_request(f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    query, history, images, use_meta, meta = parse_conversation(body.get("messages"))

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be a boolean, got {stream!r}", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    include_usage = bool(opts.get("include_usage", False))

    n = _int(body, "n", 1, 1)
    if n != 1:
        raise bad_request("only n=1 is supported", param="n", code="invalid_value")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_new = _int({"max_tokens": max_tokens}, "max_tokens", CHAT_DEFAULTS["max_new_tokens"], 1)
    temperature = _number(body, "temperature", None, lambda v: v >= 0, "a number >= 0 (0 = greedy)")
    do_sample = temperature is None or temperature > 0
    if temperature is None or temperature == 0:
        temperature = CHAT_DEFAULTS["temperature"]  # unused when greedy; as chat's default otherwise
    top_p = _number(body, "top_p", CHAT_DEFAULTS["top_p"], lambda v: 0 < v <= 1, "a number in (0, 1]")
    top_k = _int(body, "top_k", CHAT_DEFAULTS["top_k"], -1)
    top_k = 0 if top_k == -1 else top_k  # vLLM's -1 and HF's 0 both mean "no top-k"
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 63):
        raise bad_request(f"seed must be a non-negative integer, got {seed!r}", param="seed", code="invalid_value")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stop, list) or len(stop) > MAX_STOP
            or not all(isinstance(s, str) and s for s in stop)):
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them",
                          param="stop", code="invalid_value")
    rep = _number(body, "repetition_penalty", CHAT_DEFAULTS["repetition_penalty"], lambda v: v > 0, "a number > 0")
    hd_num = _int(body, "hd_num", CHAT_DEFAULTS["hd_num"], 1)
    num_beams = _int(body, "num_beams", CHAT_DEFAULTS["num_beams"], 1, max_beams)
    infer_mode = body.get("infer_mode", CHAT_DEFAULTS["infer_mode"])
    if infer_mode not in INFER_MODES:
        raise bad_request(f"infer_mode must be one of {list(INFER_MODES)}, got {infer_mode!r}", param="infer_mode",
                          code="invalid_value")
    return ChatRequest(model=model, query=query, history=history, images=images, use_meta=use_meta,
                       meta_instruction=meta, stream=stream, include_usage=include_usage, max_new_tokens=max_new,
                       do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                       repetition_penalty=rep, hd_num=hd_num, num_beams=num_beams, infer_mode=infer_mode)
