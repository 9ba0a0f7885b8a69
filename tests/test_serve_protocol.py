"""The request models' error messages: one line, and cheap however many errors a body holds."""

import json
import time

import pytest
from pydantic import ValidationError

from bigjax.serving import protocol


def test_a_body_with_thousands_of_errors_is_one_line_in_linear_time():
    """8,000 messages whose text part is a number: 16,000 errors from a 480 KB body (well
    under the body limit). Summarising them must not compare every error with every other:
    that took 12 s here, holding the server's event loop; one pass takes ~20 ms. The 2 s bound
    leaves a 100x margin for a slow machine and still fails the quadratic version (6x over)."""
    message = {"role": "user", "content": [{"type": "text", "text": 5}]}
    body = json.dumps({"messages": [message] * 8000})
    with pytest.raises(ValidationError) as e:
        protocol.ChatRequest.model_validate_json(body)
    errors = e.value.errors()
    assert len(errors) == 16000
    start = time.perf_counter()
    line = protocol.one_line(errors)
    assert time.perf_counter() - start < 2.0
    # the list branch's reason, not the string branch's "should be a valid string" before it
    assert line.startswith("messages.0.content.list[TextPart].0.text:") and "\n" not in line
    assert line.endswith("(and 7997 more)")  # the 8,000 string-branch errors left out
