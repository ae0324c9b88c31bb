"""`k2 chat`: a streaming terminal chat with the model's own template, a cache kept across turns, slash commands.

Interactive on a terminal; with `-p TEXT` or text piped on stdin it answers once (the reply on stdout, reasoning and
the stats line on stderr) and exits, for scripts.
"""
import dataclasses
import json
import os
import sys
from pathlib import Path

import typer

from k2cli import options
from runtime.errors import K2Error
from runtime.files import read_json

DEFAULT_CONTEXT = 8192
HELP = """commands:
  /help              this list
  /reset             forget the conversation (the system prompt stays)
  /system [TEXT]     show, or set, the system prompt ("/system -" removes it)
  /save FILE         write the conversation as JSON messages (OpenAI shape)
  /load FILE         continue a conversation saved by /save (a JSON list of messages)
  /think on|off      turn the model's reasoning on or off, where its template has the switch
  /set NAME VALUE    change temperature, top-k, top-p, min-p, repetition-penalty, seed or max-tokens
  /stats             context use, sampling, the last turn's numbers
  /exit              leave (Ctrl-D does too)
Ctrl-C stops a reply; a line ending in \\ continues on the next line; start a message with // to send a leading /."""


# Model text goes to a terminal: control characters (ESC starts a terminal command) are shown, never obeyed.
_VISIBLE = {c: f"^{chr(c + 64)}" for c in range(32) if chr(c) not in "\n\t"} | {127: "^?"}
_VISIBLE |= {c: "\ufffd" for c in range(0x80, 0xa0)}


def visible(text: str) -> str:
    return text.translate(_VISIBLE)


class Style:
    """ANSI styles when writing to a terminal (and NO_COLOR is unset), nothing otherwise."""

    def __init__(self, stream):
        on = stream.isatty() and not os.environ.get("NO_COLOR")
        self.dim, self.bold, self.cyan, self.yellow, self.reset = (
            ("\x1b[2m", "\x1b[1m", "\x1b[36m", "\x1b[33m", "\x1b[0m") if on else ("",) * 5)


class ReplyView:
    """Prints one reply as it streams: reasoning dimmed, content plain, each tool call on its own line."""

    def __init__(self, out, thoughts=None):
        self.out, self.thoughts = out, thoughts or out  # reasoning may go elsewhere (stderr when answering once)
        self.style, self.thought_style = Style(out), Style(self.thoughts)
        # On a terminal, model text has its control characters made visible; a pipe gets the text as it is.
        self.clean, self.thought_clean = (visible if s.isatty() else str for s in (out, self.thoughts))
        self.mode, self.at_line_start = None, True

    def _write(self, stream, text: str):
        stream.write(text)
        stream.flush()
        if text:
            self.at_line_start = text.endswith("\n")

    def show(self, event):
        from runtime.session import Notice

        if isinstance(event, Notice):
            self._end_line()
            self._write(sys.stderr, f"{Style(sys.stderr).yellow}note: {event.text}{Style(sys.stderr).reset}\n")
        elif event.kind == "reasoning":
            if self.mode != "reasoning":
                self._write(self.thoughts, self.thought_style.dim)
                self.mode = "reasoning"
            self._write(self.thoughts, self.thought_clean(event.text))
        elif event.kind == "content":
            text = event.text
            if self.mode == "reasoning":
                self._close_reasoning()
                self.mode = "answer start"
            if self.mode == "answer start":  # the answer starts on a fresh line; the stored text is unchanged
                text = text.lstrip("\n")
                if not text:
                    return
            self.mode = "content"
            self._write(self.out, self.clean(text))
        elif event.kind == "tool_call":
            self._tool_call(event.tool_call)

    def _close_reasoning(self):
        self._write(self.thoughts, self.thought_style.reset)
        self._end_line(self.thoughts)
        if self.thoughts is self.out:
            self._write(self.out, "\n")

    def _tool_call(self, call):
        if self.mode == "reasoning":
            self._close_reasoning()
        self._end_line()
        s = self.style
        arguments = call.arguments
        if call.error is None:
            arguments = json.dumps(json.loads(arguments), ensure_ascii=False)
        self._write(self.out, f"{s.cyan}→ {self.clean(call.name)}({self.clean(arguments)}){s.reset}  "
                              f"{s.dim}[{self.clean(call.id)}]{s.reset}\n")
        if call.error:
            self._write(self.out, f"{s.yellow}  (kept as written: {call.error}){s.reset}\n")
        self.mode = "tool_call"

    def _end_line(self, stream=None):
        if not self.at_line_start:
            self._write(stream or self.out, "\n")

    def finish(self, interrupted: bool = False):
        if self.mode == "reasoning":
            self._write(self.thoughts, self.thought_style.reset)
        if interrupted:
            self._write(self.out, f"{self.style.dim} [stopped]{self.style.reset}")
        self._end_line()


def run_turn(session, text: str, params, max_tokens: int, out, thoughts=None) -> bool:
    """One user message and its streamed reply; Ctrl-C stops the reply and keeps what was said. False on an error."""
    view = ReplyView(out, thoughts)
    turns_before = len(session.turns)
    turn = session.send(text, params, max_tokens)
    interrupted = False
    try:
        for event in turn:
            view.show(event)
    except KeyboardInterrupt:
        interrupted = True
    except K2Error as e:
        view.finish()
        typer.echo(f"error: {e}", err=True)
        return False
    finally:
        turn.close()
    view.finish(interrupted)
    if len(session.turns) == turns_before:  # stopped before the turn began
        return True
    stream = thoughts or out  # the stats line goes with the reasoning: off stdout when answering once
    style = Style(stream)
    stream.write(f"{style.dim}{session.turns[-1].line()}{style.reset}\n")
    stream.flush()
    return True


def read_tools(path: Path) -> list[dict]:
    """The --tools file, checked (runtime/tools.py); the list goes to the template as written."""
    from runtime.tools import check_tools

    data = read_json(path, f"--tools {path}")
    try:
        check_tools(data)
    except K2Error as e:
        raise K2Error(f"--tools {path}: {e}") from None
    return data


class Repl:
    """The interactive loop: reads lines with readline editing and history, runs slash commands and turns."""

    def __init__(self, session, params, max_tokens: int, model_name: str, history_file: Path):
        self.session, self.params, self.max_tokens, self.model_name = session, params, max_tokens, model_name
        self.history_file = history_file
        self.readline = None
        self.commands = {"/help": self.help, "/reset": self.reset, "/system": self.system, "/save": self.save,
                         "/load": self.load, "/think": self.think, "/set": self.set_option, "/stats": self.stats,
                         "/exit": None, "/quit": None}

    def _setup_readline(self):
        try:
            import readline
        except ImportError:  # Windows' Python has no readline: plain input() still works
            return
        self.readline = readline
        names = sorted(self.commands)
        readline.set_completer(lambda text, i: ([n for n in names if n.startswith(text)] + [None])[i])
        readline.set_completer_delims(" \t\n")
        readline.parse_and_bind("tab: complete")
        try:
            readline.read_history_file(self.history_file)
        except OSError:
            pass  # no history yet

    def _save_history(self):
        if self.readline:
            try:
                self.history_file.parent.mkdir(parents=True, exist_ok=True)
                self.readline.set_history_length(1000)
                self.readline.write_history_file(self.history_file)
            except OSError as e:
                typer.echo(f"note: history not saved: {e}", err=True)

    def read_message(self) -> str:
        lines = [input("> ")]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("… "))
        return "\n".join(lines)

    def run(self):
        self._setup_readline()
        style = Style(sys.stdout)
        typer.echo(f"{style.bold}k2 chat{style.reset} · {self.model_name} · context {self.session.max_context} "
                   f"tokens · {self.params.describe()} · /help for commands, Ctrl-D to leave")
        try:
            while True:
                try:
                    line = self.read_message()
                except EOFError:
                    typer.echo()
                    return
                except KeyboardInterrupt:
                    typer.echo("\n(Ctrl-D or /exit to leave)")
                    continue
                if not line.strip():
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    name, _, argument = line.strip().partition(" ")
                    if name in ("/exit", "/quit"):
                        return
                    handler = self.commands.get(name)
                    if handler is None:
                        typer.echo(f"unknown command {name}; /help lists them")
                        continue
                    try:
                        handler(argument.strip())
                    except K2Error as e:
                        typer.echo(f"error: {e}", err=True)
                    continue
                run_turn(self.session, line[1:] if line.startswith("//") else line, self.params, self.max_tokens,
                         sys.stdout)
        finally:
            self._save_history()

    # Slash commands ---------------------------------------------------------------------------------------------

    def help(self, _):
        typer.echo(HELP)

    def reset(self, _):
        self.session.reset()
        typer.echo("conversation cleared" + (" (system prompt kept)" if self.session.system else ""))

    def system(self, text):
        if not text:
            typer.echo(f"system prompt: {self.session.system!r}" if self.session.system else
                       "no system prompt (the template's default applies, if it has one)")
            return
        self.session.set_system(None if text == "-" else text)
        typer.echo("system prompt removed" if text == "-" else "system prompt set")

    def save(self, path):
        if not path:
            raise K2Error("/save needs a file name")
        path = Path(path).expanduser()
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self.session.messages, indent=2, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise K2Error(f"cannot write {path}: {e.strerror or e}") from None
        typer.echo(f"saved {len(self.session.messages)} messages to {path}")

    def load(self, path):
        if not path:
            raise K2Error("/load needs a file name")
        data = read_json(Path(path).expanduser())
        self.session.load(data.get("messages") if isinstance(data, dict) else data)
        typer.echo(f"loaded {len(self.session.messages)} messages from {path}")

    def think(self, argument):
        switch = self.session.template.thinking_switch
        if argument not in ("on", "off"):
            state = self.session.template_kwargs.get(switch, "the template's default") if switch else "no switch"
            typer.echo(f"thinking: {state} (/think on or /think off)")
            return
        self.session.set_thinking(argument == "on")
        typer.echo(f"thinking {argument}")

    def set_option(self, argument):
        name, _, value = argument.partition(" ")
        field = name.replace("-", "_")
        kinds = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repetition_penalty": float,
                 "seed": int, "max_tokens": int}
        if field not in kinds or not value.strip():
            raise K2Error(f"/set NAME VALUE, NAME one of {', '.join(k.replace('_', '-') for k in kinds)}")
        try:
            number = kinds[field](value)
        except ValueError:
            raise K2Error(f"/set {name}: {value!r} is not a number") from None
        if field == "max_tokens":
            if number < 1:
                raise K2Error("/set max-tokens: at least 1")
            self.max_tokens = number
        else:
            self.params = dataclasses.replace(self.params, **{field: number})
        typer.echo(f"{name} = {number}")

    def stats(self, _):
        s = self.session
        typer.echo(f"model: {self.model_name}")
        typer.echo(f"context: {s.engine.length(0)} of {s.max_context} tokens in the cache, {len(s.messages)} messages")
        typer.echo(f"sampling: {self.params.describe()}, at most {self.max_tokens} new tokens per reply")
        if s.turns:
            new = sum(t.new_tokens for t in s.turns)
            speeds = [t.decode_tok_s for t in s.turns if t.decode_tok_s]
            mean = f", decode {sum(speeds) / len(speeds):.1f} tok/s on average" if speeds else ""
            typer.echo(f"turns: {len(s.turns)}, {new} new tokens, "
                       f"{sum(t.reused_tokens for t in s.turns)} prompt tokens served from the cache{mean}")
            typer.echo(f"last turn: {s.turns[-1].line()}")


def chat(model: str = options.MODEL,
         prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit (also: pipe it "
                                                                 "on stdin)."),
         system: str = typer.Option(None, "--system", "-s", help="System prompt."),
         think: bool = typer.Option(None, "--think/--no-think", help="Turn reasoning on or off, where the model's "
                                                                     "template has the switch."),
         temperature: float = options.TEMPERATURE, top_k: int = options.TOP_K, top_p: float = options.TOP_P,
         min_p: float = options.MIN_P, repetition_penalty: float = options.REPETITION_PENALTY,
         seed: int = options.SEED, max_tokens: int = options.max_tokens(1024),
         ctx: int = typer.Option(DEFAULT_CONTEXT, "--ctx", min=16, help="Context window in tokens (the KV cache is "
                                                                       "allocated for it; capped at the model's)."),
         tools: Path = typer.Option(None, "--tools", help="JSON file of tool definitions (OpenAI shape) the model "
                                                          "may call."),
         device: str = options.DEVICE, dtype: str = options.DTYPE, plan: Path = options.PLAN,
         device_map: str = options.DEVICE_MAP, eager: bool = options.EAGER, threads: int = options.THREADS,
         int8: bool = options.INT8,
         as_json: bool = options.json_flag("With -p or piped input: print the reply message and the turn's numbers "
                                           "as JSON.")):
    """Chat with a model: streamed replies, reasoning dimmed, tool calls shown, the cache kept across turns.

    Default sampling is the model's generation_config.json; the flags override it.
    """
    from runtime.resolve import k2_cache_dir
    from runtime.session import ChatSession

    interactive = prompt is None and sys.stdin.isatty()
    if prompt is not None and not prompt.strip():  # as the interactive prompt refuses an empty line
        raise K2Error("-p/--prompt is empty: give the message to send")
    if prompt is None and not interactive:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise K2Error("no message: pass -p TEXT, pipe a message on stdin, or run in a terminal")
    tool_list = read_tools(tools) if tools else None
    loaded = options.load_to_run(model, device, dtype, plan, device_map, threads, int8)
    if loaded is None:
        return
    try:
        overrides = options.sampling_overrides(temperature, top_k, top_p, min_p, repetition_penalty, seed)
        params = loaded.sampling(**overrides)
        template = loaded.template
        if think is not None and template.thinking_switch is None:
            raise K2Error("--think/--no-think: this model's chat template has no thinking switch")
        engine = loaded.engine(1, loaded.context(ctx), eager=eager)
        session = ChatSession(engine, loaded.tokenizer, template, loaded.chat_stop_ids(), loaded.reply_parser,
                              system=system, tools=tool_list)
        if think is not None:
            session.set_thinking(think)
        if interactive:
            Repl(session, params, max_tokens, str(loaded.folder if model != "demo" else "demo"),
                 k2_cache_dir() / "chat_history").run()
        elif as_json:
            with open(os.devnull, "w") as sink:
                ok = run_turn(session, prompt, params, max_tokens, sink, sink)
            if not ok:
                raise typer.Exit(1)
            stats = session.turns[-1]
            typer.echo(json.dumps({"message": session.messages[-1], "decoder": engine.decoder,
                                   "stats": dataclasses.asdict(stats) | {"decode_tok_s": stats.decode_tok_s}},
                                  ensure_ascii=False))
        elif not run_turn(session, prompt, params, max_tokens, sys.stdout, sys.stderr):
            raise typer.Exit(1)
    finally:
        loaded.close()
