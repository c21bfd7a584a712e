"""The one way to turn an error into the line a person reads: its message's first line (no torch, no imports)."""

from __future__ import annotations


def first_line(error: BaseException | str, typed: bool = False, limit: int = 0) -> str:
    """The first non-blank line of `error`'s message, stripped (cut to `limit` characters when given); with
    `typed`, as 'Type: line'. An exception without a message gives its type's name; an empty text gives ''."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = (lines[0][:limit] if limit else lines[0]) if lines else ""
    name = type(error).__name__ if isinstance(error, BaseException) else ""
    if not line:
        return name
    return f"{name}: {line}" if typed and name else line


def raised_again_line(message: str) -> str:
    """An error's own message, out of the text torch's DataLoader gives an exception it raises again in the main
    process ('Caught X in DataLoader worker process 0.\\nOriginal Traceback ...\\nmodule.X: the line'); any other
    text as it is. For errors that carry their own exit code and one line across the loader's workers."""
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]
    return last.split(": ", 1)[1] if ": " in last else last
