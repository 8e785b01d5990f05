"""The `mxc-convert` console script: the converter's imports (numpy and the rest, a few hundred milliseconds)
run inside it, where Ctrl-C is already answered with status 130 instead of a traceback."""
import sys


def main(argv=None) -> int:
    try:
        from .convert import main as convert
    except KeyboardInterrupt:
        print("\nmxc-convert: interrupted; nothing was written", file=sys.stderr)
        return 130
    return convert(argv)


if __name__ == "__main__":
    sys.exit(main())
