"""What the command-line tools (mxc-chat, mxc-convert) share: one-line errors and a clean Ctrl-C.

- An error is one line on stderr, `<prog>: error: <message>`, and exit status 1; `--debug` adds the traceback.
  Errors that are not the user's (anything but ValueError / TypeError / OSError and their subclasses, which
  the project's own exceptions are) say "internal error" instead.
- Ctrl-C at any moment once the command's code runs (for mxc-convert, `convert_cli.main`, from before
  its imports) exits with status 130, after the command's own cleanup (its `finally` blocks) ran; cleanup runs
  under `shielded()`, so a second Ctrl-C cannot cut it short.
- A closed stdout (`mxc-chat ... | head`) ends the command quietly with status 1.
- MindSpore, while a compiled graph runs, replaces the SIGINT handler with its own, which answers Ctrl-C by
  sending the process SIGTERM (without a handler: "Terminated", status 143, no cleanup). SIGTERM (and
  SIGHUP, a closed terminal) are therefore handled like Ctrl-C while a command runs.
- A KeyboardInterrupt raised while MindSpore's C++ extension initialises turns into `ImportError:
  initialization failed` or aborts the interpreter ("Fatal Python error: PyThreadState_Get").
  `import_mindspore()` holds Ctrl-C back until the import is done, then raises it.
"""
import contextlib
import os
import signal
import sys
import threading
import traceback
from typing import Callable, Optional

# --compute-dtype of mxc-chat and mxc-serve (`from_pretrained(compute_dtype=...)`).
COMPUTE_DTYPE_HELP = ("arithmetic of the products (default: fp32 on CPU and GPU, the checkpoint's dtype on "
                      "Ascend). bf16 on CPU: each product's inputs rounded to bf16, sums in fp32: about twice as "
                      "fast for prompts and images where the CPU has AVX512-BF16 (docs/performance.md)")

# SIGHUP too: closing the terminal must not leave a temporary folder behind either.
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
USER_ERRORS = (ValueError, TypeError, OSError)


def _in_main_thread() -> bool:
    # signal.signal works only there; elsewhere the helpers below do nothing
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _handlers(handler):
    if not _in_main_thread():
        yield
        return
    # A signal the process was started with ignored (a background job of a script) stays ignored.
    old = {s: signal.signal(s, handler) for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def deferred_interrupts():
    """Ctrl-C (or SIGTERM) inside the block is held back and raised as KeyboardInterrupt when the block ends,
    so that the block completes: an import, or creating something together with the record of it that
    cleanup needs."""
    received = []
    with _handlers(lambda signum, frame: received.append(signum)):
        yield
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def shielded():
    """Ctrl-C (or SIGTERM) inside the block is ignored: for cleanup on the way out."""
    with _handlers(signal.SIG_IGN):
        yield


def import_mindspore():
    """`import mindspore`, not interruptible half-way (see the module docstring)."""
    with deferred_interrupts():
        import mindspore
    return mindspore


def one_line(error: BaseException) -> str:
    """The first non-empty line of an error message (MindSpore's carry C++ stacks below it)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def run_command(prog: str, body: Callable[[], Optional[int]], debug: bool = False,
                interrupted_note: str = "", whole_process: bool = False) -> int:
    """Run `body()` as the command `prog`; returns the exit status (see the module docstring).

    `whole_process`: the command is the program (not a call from Python code), so after an interrupt
    further Ctrl-C / SIGTERM are ignored until it exits: repeated Ctrl-C during a compiled graph make
    MindSpore send more SIGTERMs, one of which can arrive after the handlers are restored and would turn
    status 130 into 143."""
    try:
        with _handlers(_raise_interrupt):
            return body() or 0
    except KeyboardInterrupt:
        if whole_process and _in_main_thread():
            for s in _SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    signal.signal(s, signal.SIG_IGN)
        if debug:
            traceback.print_exc()
        print(f"\n{prog}: interrupted{interrupted_note}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`mxc-chat ... | head`): stop quietly, as Unix tools do. stdout is
        # pointed at /dev/null so that the interpreter's final flush does not report the same error again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except USER_ERRORS as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a command-line tool reports every failure in one line
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error: {type(e).__name__}: {one_line(e)}"
              + ("" if debug else " (run with --debug for the traceback)"), file=sys.stderr)
        return 1

