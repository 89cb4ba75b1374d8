"""JSON that users hand us (data rows, completions), read so that no input raises anything but a
reason: json.loads alone raises RecursionError past Python's nesting limit and ValueError past its
4,300-digit integers, and accepts lone surrogates that no encoder will write back (no torch)."""

from __future__ import annotations

import json
import re
from typing import Any

# An escaped UTF-16 surrogate in JSON text; only a lone one (not half of a pair) is not text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def json_value(text: str, text_only: bool = True) -> tuple[str | None, Any]:
    """(None, value) of one JSON text, or (why it is not data we can train on, None): not JSON
    (with its line when the text has several), nested past Python's limit, a number past its
    4,300 digits, or (``text_only``) a lone surrogate: half of a UTF-16 pair, which no text
    encoding holds, so it could not be written to the prepared data."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}: " if "\n" in text.strip() else ""
        return f"{where}not valid JSON ({exc.msg})", None
    except RecursionError:
        return "JSON nested too deep to read (arrays or objects thousands of levels deep)", None
    except ValueError as exc:  # int() past sys.get_int_max_str_digits()
        return f"a number too long to read ({str(exc).split(':')[0].lower()})", None
    if text_only and _SURROGATE_ESCAPE.search(text) and _lone_surrogate(value):
        return (
            "a string holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), not text",
            None,
        )
    return None, value


def _lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
