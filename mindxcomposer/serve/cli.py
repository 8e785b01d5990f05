"""mxc-serve: the OpenAI-compatible server (see docs/serving.md)."""
import argparse
import logging
import os
import sys
import tempfile

from ..cli_support import COMPUTE_DTYPE_HELP

DEMO_NOTICE = ("[mxc-serve] no --model given: serving the bundled demo model. Its weights are RANDOM, so its "
               "answers are gibberish; it only shows that the server runs.")


def _parser():
    p = argparse.ArgumentParser(prog="mxc-serve", description="OpenAI-compatible server for InternLM-XComposer-2.5.")
    p.add_argument("--model", help="model directory (from mxc-convert, or upstream layout with safetensors)")
    p.add_argument("--served-model-name", help="the model id clients send (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=None,
                   help="rows decoded together (continuous batching; default: 4, fewer if the memory left after "
                        "loading the model does not hold 4 rows of at least 4096 slots)")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting for a row; more get 429")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--context-len", type=int, default=None,
                   help="most prompt + max_tokens per request, the KV cache's length per row "
                        "(default: the model's max_length + 1024, or what the memory left after loading the "
                        "model holds)")
    p.add_argument("--allow-dir", action="append", default=[],
                   help="directory whose images and videos requests may name by path or file:// (repeatable)")
    p.add_argument("--no-http-images", action="store_true", help="refuse http(s) image URLs")
    p.add_argument("--max-image-bytes", type=int, default=20 * 1024 * 1024)
    p.add_argument("--max-body-bytes", type=int, default=100 * 1024 * 1024,
                   help="largest request body (base64 images included); larger ones get 413")
    p.add_argument("--fetch-timeout", type=float, default=10.0, help="seconds to fetch one http(s) image")
    p.add_argument("--mode", choices=["graph", "pynative"], default=None,
                   help="MindSpore execution of the decoding steps (default: graph, pynative on GPU)")
    p.add_argument("--device", choices=["CPU", "GPU", "Ascend"], default=None)
    p.add_argument("--compute-dtype", choices=["fp32", "bf16"], default=None, help=COMPUTE_DTYPE_HELP)
    return p


def build(args):
    """(app, engine, cleanup) for parsed arguments."""
    import mindspore as ms

    from ..demo import save_demo_model
    from ..modeling_xcomposer2 import InternLMXComposer2ForCausalLM
    from .app import create_app
    from .cache_size import available_memory, choose_cache
    from .engines import make_engine
    from .media import MediaPolicy

    if args.device:
        ms.set_context(device_target=args.device)
    ms.runtime.launch_blocking()  # asynchronous launch is 10-20x slower on CPU
    tmp = None
    if args.model:
        if not os.path.isdir(args.model):
            sys.exit(f"mxc-serve: model directory {args.model!r} does not exist")
        model = InternLMXComposer2ForCausalLM.from_pretrained(args.model, compute_dtype=args.compute_dtype)
        name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    else:
        print(DEMO_NOTICE, file=sys.stderr)
        tmp = tempfile.TemporaryDirectory()
        model = InternLMXComposer2ForCausalLM.from_pretrained(save_demo_model(tmp.name), compute_dtype=args.compute_dtype)
        name = args.served_model_name or "mindxcomposer-demo"
    if model.tokenizer is None:
        sys.exit(f"mxc-serve: {args.model!r} has no tokenizer.model")
    for d in args.allow_dir:
        if not os.path.isdir(d):
            sys.exit(f"mxc-serve: --allow-dir {d!r} is not a directory")
    cache = choose_cache(model.config, model.compute_dtype.itemsize, available_memory(), args.max_batch,
                         args.context_len)  # the cache holds the arithmetic's dtype
    logging.getLogger("mindxcomposer.serve").info("%s", cache.describe())
    context = cache.context
    compiled = None if args.mode is None else args.mode == "graph"
    engine = make_engine(model, max_batch=cache.rows, max_queue=args.max_queue, cache_len=context,
                         compiled=compiled).start()
    policy = MediaPolicy(args.allow_dir, not args.no_http_images, args.max_image_bytes, args.fetch_timeout)
    app = create_app(model, engine, name, policy, timeout=args.timeout, cache_len=context,
                     max_body_bytes=args.max_body_bytes)

    def cleanup():
        engine.stop()
        if tmp is not None:
            tmp.cleanup()

    return app, engine, cleanup


def main(argv=None):
    args = _parser().parse_args(argv)
    if (args.max_batch is not None and args.max_batch < 1) or args.max_queue < 1:
        sys.exit("mxc-serve: --max-batch and --max-queue must be >= 1")
    if args.context_len is not None and args.context_len < 1:
        sys.exit("mxc-serve: --context-len must be >= 1")
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    app, _, cleanup = build(args)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
