#!/usr/bin/env python
"""`mxc-convert` for a source checkout that is not pip-installed: same arguments, same behaviour."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from mindxcomposer.convert import main  # noqa: E402  (needs the path above)

if __name__ == "__main__":
    sys.exit(main())
