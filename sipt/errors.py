"""The one exception type users see: a message that names the file, row or key and what to do."""


class SiptError(Exception):
    """A problem with the user's input or setup. The CLI prints it without a traceback and exits 2.

    Stages delete their temporary output when one is raised: the input has to change before a rerun
    can succeed, so keeping half-written parts would only hide the error.
    """
