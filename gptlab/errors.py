"""The one exception type gptlab raises for bad input.

The CLI turns it into a one-line `error: ...` message and exit status 1; library users catch it like any
other exception. Anything else escaping the CLI is a bug in gptlab, and keeps its traceback.
"""


class GptlabError(Exception):
    """Bad input from the user: a missing file, a malformed checkpoint, an unsupported config field."""


def reason(e: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (or its type's name), for a one-line error about it."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
