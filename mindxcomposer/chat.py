"""Upstream's user-facing methods: `generate`, `chat`, `batch_chat`, `write_artical`, `write_webpage`,
`resume_2_webpage`, `screen_2_webpage`, with upstream's names, arguments and defaults.

Every call starts from a fresh KV cache and stateless RoPE, so it behaves like a call on a freshly loaded
upstream model. Decoding follows transformers 4.33 (`mindxcomposer.generation`), which upstream runs on.
"""
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .atomic import write_file
from .constants import BEGIN_TURN, CHAT_DEFAULTS as _CHAT, END_TURN
from .errors import ArgumentTypeError, InvalidArgumentError, InvalidTextError
from .generation import StopWordsCriteria, generate
from .generation.config import check_generation_settings
from .prompt import META_INSTRUCTION
from .session import ModelSession
from .validation import (check_cache_size, check_chat_inputs, check_decode_options, check_int, check_output_dir,
                         check_text, check_token_ids, check_tokenizer, describe, require_tokenizer)

EOA = END_TURN  # end of an assistant turn
BOT = BEGIN_TURN
WRITE_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n")
_UNSPLASH = r'''https://source\.unsplash\.com/random/(\d+)x(\d+)/\?([^'"]+)'''


def _clean(text: str) -> str:
    return text.replace(EOA, "").replace(BOT, "")


def _random_images(html: str) -> str:
    """Upstream's post-processing: unsplash placeholders (a retired service) become picsum URLs."""
    return re.sub(_UNSPLASH, r"https://picsum.photos/\1/\2", html)


def _seed(seed):
    return None if seed is None or seed == -1 else seed


# `generate` keywords that are not GenerationConfig fields
_DECODE_OPTIONS = ("streamer", "stopping_criteria", "logits_processor", "seed", "compiled", "infer_mode",
                   "session_factory")


def _check_rows(value, name, n, accepted):
    """One entry per request of `batch_chat`: None means n empty entries (not allowed for `queries`)."""
    if value is None and n is not None:
        return [None] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ArgumentTypeError(f"{name} must be {accepted}, got {describe(value)} ({type(value).__name__})")
    if n is None and not value:
        raise InvalidArgumentError(f"{name} is empty: batch_chat needs at least one query")
    if n is not None and len(value) != n:
        raise InvalidArgumentError(f"{n} queries but {len(value)} {name}: {name} must have one entry per query")
    return list(value)


class _BeamReadySession:
    """`ModelSession` as the decoding loop expects it (`generation.DecoderSession`).

    Beam search asks, right after prefill, for each prompt row to become `num_beams` cache rows. The
    static cache has a fixed row count, so the prefill does it at once: each prompt row runs through the
    layers once and is copied to its beams' rows r*k .. r*k+k-1 (`ModelSession.prefill(..., copies=k)`),
    which is that first expansion already done."""

    def __init__(self, session: ModelSession, num_beams: int):
        self.session = session
        self.num_beams = num_beams
        self.expanded = num_beams == 1

    def prefill(self, inputs_embeds, attention_mask, im_mask=None):
        k = self.num_beams
        if k == 1:
            return self.session.prefill(inputs_embeds, im_mask, attention_mask)
        return self.session.prefill(inputs_embeds, im_mask, attention_mask, copies=k)[::k]

    def step(self, token_ids, attention_mask=None):
        return self.session.step(token_ids)

    def reorder(self, row_index):
        if not self.expanded:  # each prompt row repeated k times: the prefill's copies are those rows
            self.expanded = True
            k = self.num_beams
            if not np.array_equal(row_index, np.repeat(np.arange(len(row_index) // k), k)):
                raise ValueError(f"the first reorder of beam search must repeat each prompt row {k} times")
            return
        self.session.reorder(np.asarray(row_index))


class ChatMixin:
    """Mixed into `InternLMXComposer2ForCausalLM`, which sets `thread_state = threading.local()`: what a call
    records for its caller is per thread, so the server's request threads, which share one model, never
    write to it."""

    @property
    def last_session(self):
        """The session (a `ModelSession`, or what `session_factory` made) of the last `generate` (`chat`,
        `batch_chat`, `write_*`) this thread ran on this model: its `compile_count` tells how many distinct
        graphs it has run (each compiled once in the process: prefill graphs are shared by every session on the
        model, and a call with the shapes of the last one reuses its session). None before the first."""
        return getattr(self.thread_state, "last_session", None)

    def generate(self, inputs_embeds=None, input_ids=None, im_mask=None, attention_mask=None, infer_mode="base",
                 streamer=None, stopping_criteria=(), seed=None, compiled=None, session_factory=None,
                 **settings) -> np.ndarray:
        """HF-style `generate` from `inputs_embeds` (image + text prompts) or `input_ids` (text only).

        Returns int64 sequences [rows, n] as transformers 4.33 does: for an embeddings prompt `<s>` followed
        by the new ids, for an ids prompt the prompt ids followed by the new ids. `settings` are
        `GenerationConfig` fields (max_new_tokens, do_sample, num_beams, temperature, top_p, top_k,
        repetition_penalty, length_penalty, eos_token_id, ...). `compiled` picks graph-compiled decoding
        steps (default: compiled except on GPU); `seed` makes sampling reproducible. `session_factory`
        replaces `ModelSession` (same arguments): the server uses it to decode rows inside a shared batch."""
        # Every setting is checked before the KV cache is allocated or a graph compiled.
        config = self._check_decoding(dict(settings, streamer=streamer, stopping_criteria=stopping_criteria,
                                           seed=seed, compiled=compiled, infer_mode=infer_mode))
        prompt_ids, embeds, attention_mask, im = self._check_prompt_arrays(input_ids, inputs_embeds, attention_mask,
                                                                           im_mask)
        rows, length = embeds.shape[:2]
        prompt_len = 1 if prompt_ids is None else prompt_ids.shape[1]
        max_new = max(1, config.total_max_length(prompt_len) - prompt_len)
        beams = config.num_beams
        check_cache_size(self.config, rows * beams, length, max_new, self.compute_dtype.itemsize)
        last = self.last_session
        if session_factory is None and isinstance(last, ModelSession) and last.fits(rows * beams, length + max_new,
                                                                                   compiled):
            # gpt-fast style: the same shapes decode in the same static cache with the graphs already compiled
            # (a new session would compile its step again and keep that graph's memory).
            session = last
            session.set_infer_mode(infer_mode)
        else:
            self.thread_state.last_session = None  # its cache can go before the new one is allocated
            session = (session_factory or ModelSession)(self, rows * beams, length + max_new, infer_mode=infer_mode,
                                                        compiled=compiled)
        self.thread_state.last_session = session
        return generate(_BeamReadySession(session, beams), embeds, attention_mask, prompt_ids=prompt_ids,
                        model_inputs={"im_mask": im}, generation_config=config, stopping_criteria=stopping_criteria,
                        streamer=streamer, rng=_seed(seed), logits_processor=settings.get("logits_processor", ()))

    def _check_decoding(self, options: dict):
        """The `generate` keywords (GenerationConfig fields and `_DECODE_OPTIONS`) checked, as the
        GenerationConfig to decode with; the model's bos / eos / pad ids fill what is not given."""
        settings = {k: v for k, v in options.items() if k not in _DECODE_OPTIONS}
        if "infer_mode" in options:
            self.check_infer_mode(options["infer_mode"])
        factory = options.get("session_factory")
        if factory is not None and not callable(factory):
            raise ArgumentTypeError(f"session_factory must be callable (as ModelSession) or None, got {factory!r}")
        check_decode_options(**{k: options[k] for k in _DECODE_OPTIONS
                                if k in options and k not in ("infer_mode", "session_factory")})
        cfg = self.config
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            settings.setdefault(key, getattr(cfg, key))
        return check_generation_settings(settings)

    def _check_prompt_arrays(self, input_ids, inputs_embeds, attention_mask, im_mask):
        """(prompt ids or None, embeddings float32 [rows, length, hidden], attention mask, im_mask) of a
        `generate` call, shapes and ids checked before anything is embedded or allocated."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidArgumentError("pass exactly one of input_ids and inputs_embeds")
        prompt_ids = None
        if input_ids is not None:
            prompt_ids = check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(prompt_ids)
            im_mask = None  # upstream: a text prompt never takes the image LoRA path
        embeds = np.asarray(inputs_embeds.asnumpy() if hasattr(inputs_embeds, "asnumpy") else inputs_embeds)
        hidden = self.config.hidden_size
        if embeds.ndim != 3 or 0 in embeds.shape[:2] or embeds.shape[2] != hidden or embeds.dtype.kind not in "fiu":
            raise InvalidArgumentError(f"inputs_embeds must be numbers [rows, length, {hidden}] with rows, length > 0, "
                                       f"got {embeds.dtype} {embeds.shape}")
        embeds = embeds.astype(np.float32)
        rows, length = embeds.shape[:2]
        if attention_mask is None:
            attention_mask = np.ones((rows, length), np.int64)
        attention_mask = np.asarray(attention_mask.asnumpy() if hasattr(attention_mask, "asnumpy") else attention_mask)
        if attention_mask.shape != (rows, length):
            raise InvalidArgumentError(f"attention_mask must be [rows, length] = {(rows, length)}, got "
                                       f"{attention_mask.shape}")
        if im_mask is None:
            im = np.zeros((rows, length), bool)
        else:
            im = np.asarray(im_mask.asnumpy() if hasattr(im_mask, "asnumpy") else im_mask)
            if im.size != rows * length:
                raise InvalidArgumentError(f"im_mask must be [rows, length] = {(rows, length)}, got {im.shape}")
            im = im.astype(bool).reshape(rows, length)
        return prompt_ids, embeds, attention_mask, im

    def eos_token_ids(self, tokenizer) -> List[int]:
        # also the end-of-assistant token, as upstream's chat does, to stop at the end of the turn
        return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids([EOA])[0]]

    def chat(self, tokenizer, query: str, image: Optional[Sequence] = [], hd_num: int = _CHAT["hd_num"],
             history: List[Tuple[str, str]] = [], streamer=None, max_new_tokens: int = _CHAT["max_new_tokens"],
             do_sample: bool = True, num_beams: int = _CHAT["num_beams"], temperature: float = _CHAT["temperature"],
             top_p: float = _CHAT["top_p"], repetition_penalty: float = _CHAT["repetition_penalty"],
             infer_mode: str = _CHAT["infer_mode"], use_meta: bool = False, meta_instruction: str = META_INSTRUCTION,
             **kwargs):
        """Upstream's `chat`: returns (response, history + [(query, response)])."""
        check_tokenizer(tokenizer, self)
        query, images, history, hd_num = check_chat_inputs(query, image, history, hd_num, meta_instruction, use_meta)
        if image is not None:
            require_tokenizer(self)  # prompts with images are tokenized with model.tokenizer, as upstream
        if not use_meta:
            meta_instruction = ""
        gen = dict(streamer=streamer, max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                   temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                   eos_token_id=self.eos_token_ids(tokenizer), infer_mode=infer_mode, **kwargs)
        self._check_decoding(gen)  # before the vision tower runs
        if image is None:
            ids = self.build_inputs(tokenizer, query, history, meta_instruction)["input_ids"]
            ids = np.asarray(ids, np.int64).reshape(1, -1)
            outputs = self.generate(input_ids=ids, **gen)[0][ids.shape[1]:]
        else:
            inputs, im_mask, _ = self.interleav_wrap_chat(query, images, history=history,
                                                          meta_instruction=meta_instruction, hd_num=hd_num)
            outputs = self.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, **gen)[0]
        response = tokenizer.decode(outputs.tolist(), skip_special_tokens=True).split(EOA)[0]
        return response, history + [(query, response)]

    def batch_chat(self, tokenizer, queries: Sequence[str], images: Optional[Sequence[Sequence]] = None,
                   hd_num: int = 24, histories: Optional[Sequence[List[Tuple[str, str]]]] = None,
                   max_new_tokens: int = 1024, do_sample: bool = False, num_beams: int = 1,
                   temperature: float = 1.0, top_p: float = 0.8, repetition_penalty: float = 1.005,
                   infer_mode: str = "base", use_meta: bool = False, meta_instruction: str = META_INSTRUCTION,
                   **kwargs) -> List[str]:
        """Several independent chat requests decoded together (not in upstream). Prompts are left-padded;
        each row gets the tokens it would get alone (through the image path of `chat`)."""
        check_tokenizer(tokenizer, self)
        require_tokenizer(self)
        queries = _check_rows(queries, "queries", None, "a list of str")
        n = len(queries)
        images = _check_rows(images, "images", n, "a list with one image list (or None) per query")
        histories = _check_rows(histories, "histories", n, "a list with one history per query")
        checked = [check_chat_inputs(q, im, h, hd_num, meta_instruction, use_meta, query_name=f"queries[{r}]")
                   for r, (q, im, h) in enumerate(zip(queries, images, histories))]
        queries, images, histories = ([c[k] for c in checked] for k in range(3))
        self._check_decoding(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                  temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                                  eos_token_id=self.eos_token_ids(tokenizer), infer_mode=infer_mode, **kwargs))
        meta = meta_instruction if use_meta else ""
        prompts = [self.interleav_wrap_chat(q, im, history=h, meta_instruction=meta, hd_num=hd_num)
                   for q, im, h in zip(queries, images, histories)]
        length = max(p[0]["inputs_embeds"].shape[1] for p in prompts)
        embeds = np.zeros((n, length, self.config.hidden_size), np.float32)
        im_mask = np.zeros((n, length), bool)
        attention_mask = np.zeros((n, length), np.int64)
        for r, (inputs, mask, _) in enumerate(prompts):
            k = inputs["inputs_embeds"].shape[1]
            embeds[r, length - k:] = inputs["inputs_embeds"][0]
            im_mask[r, length - k:] = mask[0]
            attention_mask[r, length - k:] = 1
        out = self.generate(inputs_embeds=embeds, im_mask=im_mask, attention_mask=attention_mask,
                            max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                            temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                            eos_token_id=self.eos_token_ids(tokenizer), infer_mode=infer_mode, **kwargs)
        return [tokenizer.decode(row.tolist(), skip_special_tokens=True).split(EOA)[0] for row in out]

    def write_artical(self, inst: str, image: Sequence = [], hd_num: int = 25, history=[], streamer=None,
                      max_new_tokens: int = 1024, do_sample: bool = True, num_beams: int = 1,
                      temperature: float = 1.0, top_p: float = 0.8, repetition_penalty: float = 1.005,
                      max_length: int = 8192, seed: int = -1, use_meta: bool = False, **kwargs) -> str:
        """Upstream's article writing (task LoRAs sft + dpo). As upstream: `max_new_tokens`, `top_p`,
        `hd_num` and `history` are accepted but not used (it generates up to `max_length` in all, with
        top_p 0.8, top_k 40, and the default hd_num 24), and it stops at the end-of-turn token."""
        require_tokenizer(self)
        inst, image, history, _ = check_chat_inputs(inst, image, history, hd_num, "", use_meta, query_name="inst")
        max_length = check_int(max_length, "max_length", minimum=1)
        check_int(max_new_tokens, "max_new_tokens", minimum=1)  # unused, as upstream, but not silently wrong
        self._check_decoding(dict(do_sample=do_sample, num_beams=num_beams, temperature=temperature,
                                  repetition_penalty=repetition_penalty, top_p=top_p, top_k=40, seed=seed,
                                  streamer=streamer, infer_mode="write", **kwargs))
        meta = WRITE_META_INSTRUCTION if use_meta else ""
        inputs, im_mask, n_input = self.interleav_wrap_chat(inst, image, meta_instruction=meta, max_length=max_length)
        if n_input >= max_length:
            raise InvalidArgumentError(f"the prompt is {n_input} tokens, which leaves nothing to write within "
                                       f"max_length={max_length} (prompt and article together); raise max_length")
        eoa = self.tokenizer.convert_tokens_to_ids([EOA])[0]
        out = self.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, do_sample=do_sample,
                            num_beams=num_beams, temperature=temperature, repetition_penalty=repetition_penalty,
                            stopping_criteria=[StopWordsCriteria([[eoa]])], max_new_tokens=max_length - n_input,
                            top_p=0.8, top_k=40, length_penalty=1.0, infer_mode="write", seed=_seed(seed),
                            streamer=streamer, **kwargs)
        return _clean(self.tokenizer.decode(out[0].tolist(), skip_special_tokens=True))

    def _check_web_call(self, inst, image, use_meta, task, output_dir, max_new_tokens, do_sample, num_beams,
                        temperature, repetition_penalty, seed, kwargs):
        """Every argument of a webpage method, before the first generation (a bad output_dir would
        otherwise be found only after minutes of decoding). Returns the images as a list."""
        require_tokenizer(self)
        _, images, _, _ = check_chat_inputs(inst, image, [], 24, "", use_meta, query_name="inst")
        check_text(task, "task")
        check_output_dir(output_dir)
        self._check_decoding(dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                  temperature=temperature, repetition_penalty=repetition_penalty, seed=seed,
                                  infer_mode="web", **kwargs))
        return images

    def _web_generate(self, inst, image, max_new_tokens, do_sample, num_beams, temperature, repetition_penalty,
                      seed, kwargs) -> str:
        inputs, im_mask, _ = self.interleav_wrap_chat(inst, image)
        out = self.generate(inputs_embeds=inputs["inputs_embeds"], im_mask=im_mask, do_sample=do_sample,
                            temperature=temperature, num_beams=num_beams, repetition_penalty=repetition_penalty,
                            max_new_tokens=max_new_tokens, infer_mode="web", seed=_seed(seed), **kwargs)
        return _clean(self.tokenizer.decode(out[0].tolist(), skip_special_tokens=True))

    def _save_page(self, html, task, output_dir):
        if output_dir is not None:
            write_file(os.path.join(output_dir, task.replace(" ", "_") + ".html"), html)
        return html

    def write_webpage(self, inst: str, image: Sequence = [], max_new_tokens: int = 4800, do_sample: bool = True,
                      num_beams: int = 2, temperature: float = 1.0, repetition_penalty: float = 3.0, seed: int = -1,
                      use_meta: bool = False, task: str = "Instruction-aware Webpage Generation",
                      output_dir: Optional[str] = ".", **kwargs) -> str:
        """Upstream's webpage generation (task LoRA web). The page is also written to
        `<output_dir>/<task with underscores>.html` (upstream: the current directory); None writes nothing."""
        image = self._check_web_call(inst, image, use_meta, task, output_dir, max_new_tokens, do_sample, num_beams,
                                     temperature, repetition_penalty, seed, kwargs)
        html = self._web_generate(inst, image, max_new_tokens, do_sample, num_beams, temperature,
                                  repetition_penalty, seed, kwargs)
        return self._save_page(_random_images(html), task, output_dir)

    def resume_2_webpage(self, inst: str, image: Sequence = [], max_new_tokens: int = 4800, do_sample: bool = True,
                         num_beams: int = 2, temperature: float = 1.0, repetition_penalty: float = 3.0,
                         seed: int = -1, use_meta: bool = False, task: str = "Resume-to-Personal Page",
                         output_dir: Optional[str] = ".", **kwargs) -> str:
        """Upstream's resume to personal page: `inst` is the path of a markdown resume; an HTML page is
        generated, then JavaScript for it, and the two are merged."""
        image = self._check_web_call(inst, image, use_meta, task, output_dir, max_new_tokens, do_sample, num_beams,
                                     temperature, repetition_penalty, seed, kwargs)
        if not os.path.isfile(inst):
            raise FileNotFoundError(f"resume file {inst!r} does not exist (resume_2_webpage takes the path of a "
                                    "markdown resume)")
        with open(inst, "rb") as f:
            try:
                resume = f.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidTextError(f"resume file {inst!r} is not UTF-8 text: {e}") from None
        gen = (max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed, kwargs)
        html = self._web_generate(" Generate a personal page using the content in the resume:" + resume, image, *gen)
        js = self._web_generate(" Generate JavaScript events for the html code:" + html, image, *gen)
        if re.search(r"</script>", html):
            js = re.findall(r"<script>([\s\S]*?)<\/script>", js)
            html = re.sub(r"(</script>)", f"\n{js}\n" + r"\1", html)
        elif re.search(r"</html>", html):
            html = re.sub(r"(</html>)", f"\n{js}\n" + r"\1", html)
        return self._save_page(_random_images(html), task, output_dir)

    def screen_2_webpage(self, inst: str, image: Sequence = [], max_new_tokens: int = 4800, do_sample: bool = True,
                         num_beams: int = 2, temperature: float = 1.0, repetition_penalty: float = 3.0,
                         seed: int = -1, use_meta: bool = False, task: str = "Screenshot-to-Webpage",
                         output_dir: Optional[str] = ".", **kwargs) -> str:
        """Upstream's screenshot to webpage; `inst` is ignored (and not checked), as upstream ignores it."""
        image = self._check_web_call("", image, use_meta, task, output_dir, max_new_tokens, do_sample, num_beams,
                                     temperature, repetition_penalty, seed, kwargs)
        if len(image) == 0:
            raise InvalidArgumentError("screen_2_webpage needs the screenshot: pass image=[path]")
        html = self._web_generate(" Generate the HTML code of this web image with Tailwind CSS.", image,
                                  max_new_tokens, do_sample, num_beams, temperature, repetition_penalty, seed, kwargs)
        return self._save_page(_random_images(html), task, output_dir)
