"""Chat templates from the model folder, rendered the way transformers renders them.

A template is untrusted input: it runs in jinja2's immutable sandbox with only the helpers transformers gives it
(`tojson`, `raise_exception`, `strftime_now`, a `namespace` that refuses private names). Inputs reach it as plain
JSON values. User strings have their control tokens marked (runtime/tokenizer.py) so that only the template's own
markers become special ids.
"""
import json
import re
from datetime import datetime
from pathlib import Path

from runtime.errors import K2Error
from runtime.tokenizer import MARK_END, MARK_START, Tokenizer, read_tokenizer_config

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
THINKING_SWITCHES = ("enable_thinking", "thinking")  # Qwen3's name, K2.5's name
_PROBE = "\ue000"  # a private-use character no template writes: marks where a message's content went


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask templates) renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # Private names on a namespace are a path to CPython internals; templates never need them.
        def __init__(*args, **kwargs):
            self, values = args[0], dict(*args[1:], **kwargs)
            for name in values:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, values)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a template may not set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' writes plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, namespace=Namespace,
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


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        import jinja2
        import jinja2.meta

        self.source = source
        self.special_tokens = special_tokens or {}  # bos_token, eos_token, ... as the template reads them
        env = _environment()
        try:
            ast = env.parse(source)
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise K2Error(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from None
        self.variables = jinja2.meta.find_undeclared_variables(ast)
        literals = {node.data for node in ast.find_all(jinja2.nodes.TemplateData)}
        literals |= {node.value for node in ast.find_all(jinja2.nodes.Const) if isinstance(node.value, str)}
        self.literal_text = "\0".join(literals)  # \0 so a search cannot match across two literals

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ChatTemplate":
        """`chat_template.jinja` if present, else `tokenizer_config.json`'s `chat_template` (a string, or a list of
        named templates of which `default` is the chat one)."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        source = None
        if (folder / "chat_template.jinja").exists():
            source = (folder / "chat_template.jinja").read_text()
        elif isinstance(config.chat_template, str):
            source = config.chat_template
        elif config.chat_template is not None:
            source = {t.name: t.template for t in config.chat_template}.get("default")
        if not source:
            raise K2Error(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json "
                          "chat_template); use `k2 generate` for raw completion")
        return cls(source, config.special_tokens())

    @property
    def thinking_switch(self) -> str | None:
        """The template variable that turns reasoning on and off, if the template has one."""
        return next((name for name in THINKING_SWITCHES if name in self.variables), None)

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = False,
               **kwargs) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(tokenize=False) writes it."""
        import jinja2

        variables = {**self.special_tokens, **_plain(kwargs)}
        try:
            return self.template.render(messages=normalize_messages(messages), tools=_plain(tools), documents=None,
                                        add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.SecurityError as e:
            raise K2Error(f"the chat template tried something the sandbox forbids: {e}") from None
        except jinja2.TemplateError as e:
            raise K2Error(f"the chat template refused the conversation: {e}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            raise K2Error(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None

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
        except K2Error:
            return None
        tail = text[text.rfind(_PROBE) + 1:] if _PROBE in text else ""
        control = self.control_tokens(tokenizer)
        found = [(tail.find(t), t) for t in control if t in tail]
        return tokenizer.special_tokens[min(found)[1]] if found else None
