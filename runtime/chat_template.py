"""Chat templates from the model folder, rendered the way transformers renders them.

A template is untrusted input: it runs in jinja2's immutable sandbox with only the helpers transformers gives it
(`tojson`, `raise_exception`, `strftime_now`, a `namespace` that refuses private names). Inputs reach it as plain
JSON values. User strings have their control tokens marked (runtime/tokenizer.py) so that only the template's own
markers become special ids.

A render is also bounded, so that a template that loops, recurses or builds text without end fails with one line
instead of hanging or exhausting memory: the parsed template is rewritten so that every loop step, every write and
every `~` goes through a meter, and the sandbox's own hooks (calls, filters, attribute and item lookups, `*`, `**`, `+`,
`%`) read it too. The meter lives in a ContextVar, not in signals or threads, so a render in any thread is bounded
alone, whatever else runs.
"""
import functools
import json
import re
import time
import types
from contextvars import ContextVar
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.visitor
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from runtime.errors import K2Error
from runtime.tokenizer import MARK_END, MARK_START, MAX_TEXT_CHARS, Tokenizer, read_tokenizer_config

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
THINKING_SWITCHES = ("enable_thinking", "thinking")  # Qwen3's name, K2.5's name
_PROBE = "\ue000"  # a private-use character no template writes: marks where a message's content went

# Bounds of one render, far above what a real template reaches: K2's, Qwen3's and DeepSeek-V3's templates render a
# conversation that fills K2's 262,144-token context (about a million characters) with 100 tools in well under a
# second, writing at most twice their output and building 2-3 times it (each `+` copies).
MAX_RENDER_SECONDS = 10.0
# Characters written in one render, and the length of any one string or list it builds: the rendered prompt goes to
# the tokenizer, which takes no more.
MAX_RENDER_CHARS = MAX_TEXT_CHARS
# All the strings and lists one render builds together: what bounds its memory.
MAX_BUILT_CHARS = 10 * MAX_RENDER_CHARS
# An integer a template computes: Python prints none above 4,300 digits (about 14,300 bits) anyway.
MAX_INT_BITS = 16_384


class RenderLimitError(K2Error):
    """A render went past a bound (time, size, recursion depth): the template's fault, whatever the conversation."""


class _Meter:
    """What the render running in this context has spent."""

    def __init__(self):
        self.seconds = MAX_RENDER_SECONDS
        self.deadline = time.monotonic() + self.seconds
        self.written = self.built_total = 0

    def tick(self):
        if time.monotonic() > self.deadline:
            raise RenderLimitError(f"rendering took more than {self.seconds:g} s")

    def write(self, value) -> str:
        self.tick()
        text = str(value)
        self.written += len(text)
        if self.written > MAX_RENDER_CHARS:
            raise RenderLimitError(f"rendered more than {MAX_RENDER_CHARS:,} characters")
        return text

    def will_build(self, length: int):
        """Refuse a string or list of `length` before it is made."""
        if length > MAX_RENDER_CHARS:
            raise RenderLimitError(f"built a string or list of more than {MAX_RENDER_CHARS:,} characters or items")

    def will_compute(self, bits: int):
        if bits > MAX_INT_BITS:
            raise RenderLimitError(f"computed an integer of more than {MAX_INT_BITS:,} bits")

    def sizes(self, values):
        """Integer arguments of a method or filter are widths and counts: none may ask for more than a render
        builds."""
        for value in values:
            if isinstance(value, int):
                self.will_build(abs(value))

    def built(self, value):
        """Count a value a call, a filter or an operator returned: none may be bigger than a render may build, nor all
        of them together more than MAX_BUILT_CHARS."""
        if isinstance(value, (str, list, tuple, dict)):
            self.will_build(len(value))
            self.built_total += len(value)
            if self.built_total > MAX_BUILT_CHARS:
                raise RenderLimitError(f"built more than {MAX_BUILT_CHARS:,} characters or items in all")
        elif isinstance(value, int):
            self.will_compute(value.bit_length())
        return value


_METER: ContextVar[_Meter] = ContextVar("chat_template_meter")


def _meter() -> _Meter:
    # Outside a render (jinja folding a constant expression while it compiles) there is no meter: the lookup fails,
    # and jinja leaves the expression to render time, where it is metered.
    return _METER.get()


def _size(value) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_binop(meter: _Meter, operator: str, left, right):
    """Refuse what `*`, `**` and `+` would build too big, before they build it (`%` is checked after)."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*" and ints:
        meter.will_compute(left.bit_length() + right.bit_length())
    elif operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if _size(sequence) is not None and isinstance(count, int):
                meter.will_build(_size(sequence) * max(count, 0))
    elif operator == "**" and ints and right > 0 and abs(left) > 1:
        meter.will_compute(right * abs(left).bit_length())
    elif operator == "+" and _size(left) is not None and _size(right) is not None:
        meter.will_build(_size(left) + _size(right))


def _is_method(obj) -> bool:
    owner = getattr(obj, "__self__", None)
    return owner is not None and not isinstance(owner, types.ModuleType)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask templates) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    # Private names on a namespace are a path to CPython internals; templates never need them.
    def __init__(*args, **kwargs):
        self, values = args[0], dict(*args[1:], **kwargs)
        for name in values:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, values)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a template may not set {name!r} on a namespace")


class _Metered(jinja2.visitor.NodeTransformer):
    """Rewrites a parsed template so that each loop step, each write and each `~` calls a `k2_*` hook of the
    environment: the places where a template spends time or text without calling anything the sandbox sees."""

    def __init__(self, environment):
        self.environment = environment

    def hook(self, name, args, lineno):
        call = nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)
        return call.set_lineno(lineno).set_environment(self.environment)

    def visit_For(self, node):
        self.generic_visit(node)
        node.iter = self.hook("k2_loop", [node.iter], node.lineno)
        return node

    def visit_Output(self, node):
        self.generic_visit(node)
        node.nodes = [self.hook("k2_write", [child], child.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node):
        self.generic_visit(node)
        return self.hook("k2_concat", node.nodes, node.lineno)


class _MeteredEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with every hook it offers reading the render's meter."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def metered(self, ast):
        """The parsed template `ast`, rewritten to call the `k2_*` hooks below."""
        return _Metered(self).visit(ast)

    def call_binop(self, context, operator, left, right):
        meter = _meter()
        meter.tick()
        _check_binop(meter, operator, left, right)
        return meter.built(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):
        if getattr(__obj, "__self__", None) is __self:  # a k2_* hook: only a metered template names them
            return __context.call(__obj, *args, **kwargs)
        meter = _meter()
        meter.tick()
        if _is_method(__obj):
            meter.sizes((*args, *kwargs.values()))
        return meter.built(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _meter().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _meter().tick()
        return super().getitem(obj, argument)

    def k2_loop(self, iterable):
        meter = _meter()
        for item in iterable:
            meter.tick()
            yield item

    def k2_write(self, value):
        return _meter().write(value)

    def k2_concat(self, *values):
        meter, texts = _meter(), [str(value) for value in values]
        meter.will_build(sum(map(len, texts)))
        return meter.built("".join(texts))


def _metered_filter(function):
    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def filter(*args, **kwargs):
        meter = _meter()
        meter.tick()
        meter.sizes((*args[1:], *kwargs.values()))  # args[0] is what is filtered (or what the filter asks for)
        return meter.built(function(*args, **kwargs))

    return filter


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' writes plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> _MeteredEnvironment:
    env = _MeteredEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    # Single calls the meter cannot stop, which no chat template uses: lipsum(n) writes n paragraphs; wordwrap chops
    # a long word in time quadratic in its length (hours for a few million characters).
    del env.globals["lipsum"], env.filters["wordwrap"]
    env.filters = {name: _metered_filter(function) for name, function in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *args, **kwargs: dict(*args, **kwargs))
    return env


def _plain(value):
    """JSON values only: objects with methods are what a sandbox escape is made of."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # Subclasses (enums, numpy scalars) lose their extra methods.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"


def normalize_messages(messages: list[dict]) -> list[dict]:
    """What transformers' apply_chat_template hands the template: keys with a None value dropped, and reasoning under
    every name templates read it by (`reasoning_content`, `thinking`)."""
    out = []
    for message in _plain(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise K2Error(f"a chat message must be an object with a 'role', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def mark_control_tokens(value, pattern: re.Pattern):
    """Wrap every control token inside user strings (recursively) in MARK_START/MARK_END; dict keys stay as they are.
    Markers already in the text are removed first, so a user cannot forge a marked token."""
    if isinstance(value, str):
        value = value.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", value)
    if isinstance(value, dict):
        return {k: mark_control_tokens(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [mark_control_tokens(v, pattern) for v in value]
    return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "the chat template"):
        self.source = source
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as the template reads them
        self.origin = origin  # names the template in errors: "the chat template in FOLDER/chat_template.jinja"
        env = _environment()
        try:
            ast = env.parse(source)
            self.variables = jinja2.meta.find_undeclared_variables(ast)
            literals = {node.data for node in ast.find_all(nodes.TemplateData)}
            literals |= {node.value for node in ast.find_all(nodes.Const) if isinstance(node.value, str)}
            self.template = env.from_string(env.metered(ast))
        except TemplateSyntaxError as e:
            raise K2Error(f"{origin} has a syntax error at line {e.lineno}: {_one_line(e.message)}") from None
        except RecursionError:
            raise K2Error(f"{origin} nests deeper than Python can parse") from None
        self.literal_text = "\0".join(literals)  # \0 so a search cannot match across two literals

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTemplate":
        """`chat_template.jinja` if present, else `tokenizer_config.json`'s `chat_template` (a string, or a list of
        named templates of which `default` is the chat one)."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        path, source = folder / "chat_template.jinja", None
        if path.exists():
            try:
                source = path.read_bytes().decode()
            except UnicodeDecodeError as e:
                raise K2Error(f"{path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
        else:
            path = folder / "tokenizer_config.json"
            if isinstance(config.chat_template, str):
                source = config.chat_template
            elif config.chat_template is not None:
                source = {t.name: t.template for t in config.chat_template}.get("default")
        if not source:
            raise K2Error(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json "
                          "chat_template); use `k2 generate` for raw completion")
        return cls(source, config.special_tokens(), f"the chat template in {path}")

    @property
    def thinking_switch(self) -> str | None:
        """The template variable that turns reasoning on and off, if the template has one."""
        return next((name for name in THINKING_SWITCHES if name in self.variables), None)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
               **kwargs) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(tokenize=False) writes it, or a one-line
        K2Error; within MAX_RENDER_SECONDS and MAX_RENDER_CHARS (a RenderLimitError past them)."""
        variables = {**self.special_tokens, **_plain(kwargs)}
        messages, tools = normalize_messages(messages), _plain(tools)
        meter = _METER.set(_Meter())
        try:
            return self.template.render(messages=messages, tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except RenderLimitError as e:
            raise RenderLimitError(f"{self.origin}: {e}") from None
        except RecursionError:
            raise RenderLimitError(f"{self.origin}: rendering recursed deeper than Python allows (a macro or a "
                                   "recursive loop that calls itself without end)") from None
        except MemoryError:
            raise RenderLimitError(f"{self.origin}: rendering ran out of memory") from None
        except SecurityError as e:
            raise K2Error(f"{self.origin} tried something the sandbox forbids: {_one_line(e)}") from None
        except TemplateError as e:
            raise K2Error(f"{self.origin} refused the conversation: {_one_line(e)}") from None
        except (TypeError, AttributeError, LookupError, ValueError, ArithmeticError) as e:
            raise K2Error(f"{self.origin} failed on this conversation: {type(e).__name__}: {_one_line(e)}") from None
        finally:
            _METER.reset(meter)

    def control_tokens(self, tokenizer: Tokenizer) -> set[str]:
        """Tokens that only the template may write: the special ones, and added tokens the template's own text
        contains (Qwen3's `<think>` is not special, but its template writes it). Whitespace tokens are text."""
        return {text for text, special in tokenizer.special_flags.items()
                if special or (text in self.literal_text and not text.isspace())}

    def encode(self, tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = False, **kwargs) -> list[int]:
        """Prompt ids: the template's markers are special ids; whatever the user wrote is ordinary text."""
        control = self.control_tokens(tokenizer)
        pattern = re.compile("|".join(re.escape(t) for t in sorted(control, key=len, reverse=True)) or "(?!)")
        text = self.render(mark_control_tokens(_plain(messages), pattern), mark_control_tokens(_plain(tools), pattern),
                           add_generation_prompt, **mark_control_tokens(_plain(kwargs), pattern))
        return tokenizer.encode_marked(text, control)

    def end_of_turn(self, tokenizer: Tokenizer) -> int | None:
        """The token the template closes an assistant turn with (`<|im_end|>` for K2 and Qwen3), found by rendering
        a probe reply and reading the first control token after it."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
        try:
            text = self.render(probe)
        except RenderLimitError:
            raise  # it would only fail again, as slowly, on the real conversation
        except K2Error:
            return None
        tail = text[text.rfind(_PROBE) + 1:] if _PROBE in text else ""
        control = self.control_tokens(tokenizer)
        found = [(tail.find(t), t) for t in control if t in tail]
        return tokenizer.special_tokens[min(found)[1]] if found else None
