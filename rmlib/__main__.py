"""`python -m rmlib`: the command line, with Ctrl-C handled from the first instant.

Importing rmlib.cli imports torch (about 1.5 s); an interrupt during that import, or
anywhere after it, ends with "rmlib: interrupted" and status 130, never a traceback.
"""

import sys


def run() -> int:
    try:
        from rmlib.cli import main

        return main()
    except KeyboardInterrupt:
        print("rmlib: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
