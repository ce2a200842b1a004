"""The one exception type users see: a message that names the file, row or key and what to do."""


class SiptError(Exception):
    """A problem with the user's input or setup. The CLI prints it without a traceback and exits 2.

    Stages delete their temporary output when one is raised: the input has to change before a rerun
    can succeed, so keeping half-written parts would only hide the error.
    """


class StageInterrupted(Exception):
    """A failure outside the input (a server that stopped answering, a lost worker).

    The stage keeps its finished parts and marks itself failed; rerunning the same command once the
    cause is gone continues where it stopped. The CLI prints the message and exits 3.
    """


def one_of(names) -> str:
    """'a, b or c': choices in a message or a help text."""
    *some, last = list(names) or [""]
    return f"{', '.join(some)} or {last}" if some else last
