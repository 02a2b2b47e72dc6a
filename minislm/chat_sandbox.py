"""Rendering a chat template that came with a download: sandboxed, and bounded.

A chat template is a Jinja program written by whoever published the model, and it
runs on the user's machine. Two separate dangers, two separate defences:

1. What it can reach. jinja2's ImmutableSandboxedEnvironment refuses attribute
   and method access a template could use to climb into Python
   (`messages.__class__.__mro__...`) and any mutation of the data it is given.

2. How much it computes. The sandbox's rules say nothing about cost:
   `{% for i in range(100000) %}{% for j in range(100000) %}...` is legal and runs
   for hours; `{{ 'x' * 10**10 }}` is legal and asks for 10 GB. So the template
   renders in a child Python process (it imports only jinja2; ~50 ms to start)
   with a memory limit, a wall-clock timeout, and a cap on the characters it may
   output. A SIGALRM timer would be lighter but works only on the main thread,
   and a server renders templates in request threads; a child process can be
   stopped from any thread, and its memory goes back to the OS when it ends.

This file is also the child's program (`python -I chat_sandbox.py`), so it
imports nothing from minislm.
"""

import json
import subprocess
import sys

import jinja2
import jinja2.ext
import jinja2.sandbox

TIMEOUT_SECONDS = 5.0  # real templates render in milliseconds, even over a long chat
MAX_OUTPUT_CHARS = 4_000_000  # ~1M tokens: more text than any model's context holds
MEMORY_LIMIT_BYTES = 1 << 30  # the child's address space


class TemplateRenderError(Exception):
    """The template raised, exceeded a limit, or could not run; the message says which."""


def render_bounded(
    template: str,
    variables: dict,
    timeout: float = TIMEOUT_SECONDS,
    max_chars: int = MAX_OUTPUT_CHARS,
) -> str:
    """The template's output for these (JSON-serialisable) variables, rendered in a
    limited child process. Raises TemplateRenderError for anything but success."""
    try:
        request = json.dumps({"template": template, "variables": variables, "max_chars": max_chars})
    except (TypeError, ValueError) as e:
        raise TemplateRenderError(f"cannot pass the chat to the template ({e})") from None
    try:
        child = subprocess.run(
            [sys.executable, "-I", __file__],
            input=request.encode("utf-8", "surrogatepass"),
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise TemplateRenderError(f"rendering took longer than {timeout:g} s (a loop that never ends?)") from None
    except OSError as e:
        raise TemplateRenderError(f"cannot start the renderer ({e.strerror})") from None
    try:
        reply = json.loads(child.stdout.decode("utf-8", "surrogatepass"))
    except ValueError:
        reason = "ran out of memory" if child.returncode in (-9, 137) else f"exit status {child.returncode}"
        raise TemplateRenderError(f"the renderer stopped without an answer ({reason})") from None
    if "error" in reply:
        raise TemplateRenderError(reply["error"])
    return reply["text"]


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers' mark for the assistant's
    own words (it builds a training mask from them). Plain Jinja does not know the tag
    and refuses the whole template; rendering a prompt only needs the words, so the
    block renders its body unchanged, as transformers' renderer does."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def chat_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    """The same whitespace rules and tags transformers uses, inside the sandbox."""

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationBlock]
    )
    env.globals["raise_exception"] = raise_exception
    return env


class OutputTooLong(Exception):
    pass


def render_in_sandbox(template: str, variables: dict, max_chars: int) -> str:
    """Render in this process (the child), stopping once the output passes max_chars."""
    pieces, total = [], 0
    for piece in chat_environment().from_string(template).generate(**variables):
        total += len(piece)
        if total > max_chars:
            raise OutputTooLong
        pieces.append(piece)
    return "".join(pieces)


def child_main() -> None:
    """Read {template, variables, max_chars} as JSON on stdin; write {text} or {error}."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):  # no such limit on this system: the timeout still holds
        pass
    request = json.loads(sys.stdin.buffer.read().decode("utf-8", "surrogatepass"))
    try:
        reply = {"text": render_in_sandbox(request["template"], request["variables"], request["max_chars"])}
    except OutputTooLong:
        reply = {"error": f"renders more than {request['max_chars']:,} characters"}
    except MemoryError:
        reply = {"error": f"needs more than {MEMORY_LIMIT_BYTES >> 20} MiB of memory"}
    except RecursionError:
        reply = {"error": "recursion too deep"}
    except Exception as e:  # the template's own error: ZeroDivisionError, TypeError, TemplateError ...
        first_line = (str(e).splitlines() or [""])[0][:200]
        reply = {"error": f"{type(e).__name__}: {first_line}" if first_line else type(e).__name__}
    sys.stdout.buffer.write(json.dumps(reply).encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    child_main()
