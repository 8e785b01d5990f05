"""mxc-chat: chat with IXC2.5 from the command line (a thin wrapper over `model.chat`).

Settings, the query and the images are checked before MindSpore is imported or the model loaded; errors are
one line (`--debug` shows the traceback) and Ctrl-C exits with 130 after removing the demo model's
temporary folder (`cli_support`).
"""
import argparse
import os
import sys
import tempfile
import traceback

from .cli_support import COMPUTE_DTYPE_HELP

DEMO_NOTICE = ("[mxc-chat] no --model given: using the bundled demo model. Its weights are RANDOM, so its "
               "answers are gibberish; it only shows that the pipeline runs.")


def _parser():
    p = argparse.ArgumentParser(prog="mxc-chat", description="Chat with InternLM-XComposer-2.5 on MindSpore.")
    p.add_argument("query", nargs="?", help="one-shot question; without it, an interactive multi-turn chat")
    p.add_argument("--model", help="model directory (from mxc-convert, or upstream layout with safetensors)")
    p.add_argument("--image", action="append", default=[], help="image or video path (repeatable)")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--hd-num", type=int, default=24)
    p.add_argument("--mode", choices=["graph", "pynative"], default=None,
                   help="MindSpore execution mode of the decoding steps (default: graph, pynative on GPU)")
    p.add_argument("--device", choices=["CPU", "GPU", "Ascend"], default=None)
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None,
                   help=COMPUTE_DTYPE_HELP)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv=None):
    """`argv` None: the command line of this process (then `main` is the whole program)."""
    args = _parser().parse_args(argv)
    from .cli_support import run_command

    return run_command("mxc-chat", lambda: _chat(args), debug=args.debug, whole_process=argv is None)


def _check_arguments(args) -> dict:
    """The `chat` keywords from the command line, checked by the same code `chat` checks them with."""
    from .constants import IMAGE_EXTENSIONS
    from .generation.config import check_generation_settings
    from .image_processing import load_image
    from .prompt import split_prompt
    from .validation import check_images, check_int, check_model_dir, check_seed, check_text

    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
               temperature=args.temperature, top_p=args.top_p)
    check_generation_settings(gen)
    gen["hd_num"] = check_int(args.hd_num, "hd_num", minimum=1)
    if args.seed is not None:
        gen["seed"] = check_seed(args.seed)
    images = check_images(args.image)
    if args.query is not None:
        split_prompt(check_text(args.query, "query"), len(images))  # <ImageHere> markers against --image
    for path in images:
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            load_image(path)  # a corrupt or empty image is reported now, not after the model has loaded
    if args.model is not None:
        check_model_dir(args.model, need_tokenizer=True)
    gen["compiled"] = None if args.mode is None else args.mode == "graph"
    return gen


def _chat(args) -> int:
    gen = _check_arguments(args)
    from .cli_support import deferred_interrupts, import_mindspore, one_line, shielded

    ms = import_mindspore()
    from .demo import save_demo_model
    from .errors import InputError, InvalidArgumentError
    from .generation import TextStreamer
    from .modeling_xcomposer2 import InternLMXComposer2ForCausalLM
    from .validation import require_tokenizer

    if args.device:
        try:
            ms.set_context(device_target=args.device)
        except RuntimeError as e:  # MindSpore's report of a device this build or machine does not have
            raise InvalidArgumentError(f"--device {args.device}: {one_line(e)}") from None
    ms.runtime.launch_blocking()  # asynchronous launch is 10-20x slower on CPU
    tmp = None
    try:
        if args.model:
            model = InternLMXComposer2ForCausalLM.from_pretrained(args.model, compute_dtype=args.compute_dtype)
        else:
            print(DEMO_NOTICE, file=sys.stderr)
            with deferred_interrupts():  # the folder and the record of it, or neither
                tmp = tempfile.TemporaryDirectory(prefix="mxc-chat-demo-")
            model = InternLMXComposer2ForCausalLM.from_pretrained(save_demo_model(tmp.name),
                                                                  compute_dtype=args.compute_dtype)
        require_tokenizer(model)

        def ask(query, history):
            streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            response, history = model.chat(model.tokenizer, query, image=args.image, history=history,
                                           streamer=streamer, **gen)
            print(flush=True)
            return history

        if args.query is not None:
            ask(args.query, [])
            return 0
        # Bytes that are not UTF-8 reach `chat` as lone surrogates, which it reports clearly, instead of
        # stopping the session with a UnicodeDecodeError.
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="surrogateescape")
        history = []
        print("mxc-chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
        while True:
            try:
                query = input("> ")
            except EOFError:
                break
            if not query.strip():
                break
            try:
                history = ask(query, history)
            except (InputError, InvalidArgumentError) as e:  # this turn's text: say so and go on
                if args.debug:
                    traceback.print_exc()
                print(f"mxc-chat: error: {one_line(e)}", file=sys.stderr)
        return 0
    finally:
        if tmp is not None:
            with shielded():
                tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
