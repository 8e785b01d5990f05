"""mxc-chat: chat with IXC2.5 from the command line (a thin wrapper over `model.chat`)."""
import argparse
import os
import sys
import tempfile

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
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    import mindspore as ms

    from .demo import save_demo_model
    from .modeling_xcomposer2 import InternLMXComposer2ForCausalLM

    if args.device:
        ms.set_context(device_target=args.device)
    ms.runtime.launch_blocking()  # asynchronous launch is 10-20x slower on CPU
    for path in args.image:
        if not os.path.exists(path):
            sys.exit(f"mxc-chat: image {path!r} does not exist")
    tmp = None
    try:
        if args.model:
            if not os.path.isdir(args.model):
                sys.exit(f"mxc-chat: model directory {args.model!r} does not exist")
            try:
                model = InternLMXComposer2ForCausalLM.from_pretrained(args.model)
            except (ValueError, FileNotFoundError) as e:
                sys.exit(f"mxc-chat: cannot load {args.model!r}: {e}")
        else:
            print(DEMO_NOTICE, file=sys.stderr)
            tmp = tempfile.TemporaryDirectory()
            model = InternLMXComposer2ForCausalLM.from_pretrained(save_demo_model(tmp.name))
        if model.tokenizer is None:
            sys.exit(f"mxc-chat: {args.model!r} has no tokenizer.model")
        from .generation import TextStreamer

        compiled = None if args.mode is None else args.mode == "graph"
        gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                   temperature=args.temperature, top_p=args.top_p, hd_num=args.hd_num, compiled=compiled)
        if args.seed is not None:
            gen["seed"] = args.seed

        def ask(query, history):
            streamer = TextStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
            response, history = model.chat(model.tokenizer, query, image=args.image, history=history,
                                           streamer=streamer, **gen)
            print(flush=True)
            return history

        if args.query is not None:
            ask(args.query, [])
            return 0
        history = []
        print("mxc-chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
        while True:
            try:
                query = input("> ")
            except EOFError:
                break
            if not query.strip():
                break
            history = ask(query, history)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
