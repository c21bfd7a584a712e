"""The one way to turn an error into the line a person reads: its message's first line (no torch, no imports)."""

from __future__ import annotations

import re


def first_line(error: BaseException | str, typed: bool = False, limit: int = 0) -> str:
    """The first non-blank line of `error`'s message, stripped (cut to `limit` characters when given); with
    `typed`, as 'Type: line'. An exception without a message gives its type's name; an empty text gives ''."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = (lines[0][:limit] if limit else lines[0]) if lines else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    if not line:
        return name
    return f"{name}: {line}" if typed and name else line


def short_error(exc: BaseException, limit: int = 120) -> str:
    """'Type: first line of the message', without the object reprs PIL and webdataset add."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    text = re.sub(r"\s*@ <.*", "", first_line(text))  # webdataset: ' @ <file object>'
    text = re.sub(r"\s*<_io\.\w+ (object at 0x[0-9a-f]+|name=[^>]*)>", "", text)  # PIL: '<_io.BytesIO object ...>'
    text = re.sub(r"^\w+, \S+\.(cpp|cu|h):\d+, ", "", text)  # torch ops: 'decode_jpeg, /build/path.cpp:171, '
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def raised_again_line(message: str) -> str:
    """An error's own message, out of the text torch's DataLoader gives an exception it raises again in the main
    process ('Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: the line'); any other
    text as it is. For errors that carry their own exit code and one line across the loader's workers."""
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]
    return last.split(": ", 1)[1] if ": " in last else last
