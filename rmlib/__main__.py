"""`python -m rmlib` (and the `rmlib` script): the command line as a process.

What only a process has is handled here. Importing rmlib.cli imports torch (about 1.5 s);
an interrupt during that import, or anywhere after it, ends with "rmlib: interrupted" and
status 130, never a traceback; once the command has finished, an interrupt no longer
changes its status. A reader that leaves (`... | head`) does not stop the work.

Explained in the book: book/own_upgrade.
"""

import os
import signal
import sys


class _ClosedPipeSafe:
    """stdout that survives its reader leaving (`... | head`): once the pipe is closed,
    further output goes to /dev/null and the command finishes its work (its --json and
    --out files) and exits 0, without a BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def _to_devnull(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._to_devnull()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)




def _exit_interrupted(signum, frame) -> None:
    """Ctrl-C while the command's modules load: nothing to clean up yet, so leave at once
    (a KeyboardInterrupt raised inside a library's import may come out as another error)."""
    os.write(2, b"rmlib: interrupted\n")
    os._exit(130)


def run() -> int:
    sys.stdout = _ClosedPipeSafe(sys.stdout)
    sys.stderr = _ClosedPipeSafe(sys.stderr)  # `... 2>&1 | head` closes both
    signal.signal(signal.SIGINT, _exit_interrupted)
    try:
        from rmlib.cli import main

        # from here an interrupt is a KeyboardInterrupt, so that work in progress cleans up
        # (a half-written output is removed) before the status is 130
        signal.signal(signal.SIGINT, signal.default_int_handler)
        status = main()
    except KeyboardInterrupt:
        print("rmlib: interrupted", file=sys.stderr)
        status = 130
    # The work is done and its status decided: an interrupt during the interpreter's
    # shutdown (torch's exit handlers) must not turn it into a death by signal.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.flush()
    sys.stderr.flush()
    return status


if __name__ == "__main__":
    sys.exit(run())
