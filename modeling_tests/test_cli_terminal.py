"""Issue 12, item 4: streamed drafts on a real 80x24 pseudo-terminal (rendered by pyte, a VT100 emulator) never
leave garbage, even once the screen scrolls; nothing but text goes to a pipe or a file."""

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pyte  # the test extra's VT100 emulator: what a terminal would show
import pytest
import torch
from transformers import AutoTokenizer, TextDiffusionStreamer

from llada_moe_hf import LLaDAMoEForDiffusionLM
from llada_moe_hf.demo import TINY_ASSET_DIR, chat_prompt, generation_kwargs, held_out_questions
from llada_moe_hf.terminal import DiffusionStreamer, cell_width


ESCAPE = re.compile(r"\x1b")


class PtyTerminal:
    """A pseudo-terminal of `columns` x `lines`: what is written to it goes through the kernel's line discipline
    (\\n becomes \\r\\n) into pyte, which keeps the scrolled-off lines. Synchronous: every write is rendered
    before the call returns."""

    def __init__(self, columns=80, lines=24):
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.screen = pyte.HistoryScreen(columns, lines, history=10_000)
        self.stream = pyte.ByteStream(self.screen)
        self.encoding = "utf-8"
        self.raw = bytearray()

    # the file interface DiffusionStreamer and print() use
    def write(self, text):
        view = memoryview(text.encode(self.encoding))
        while view:
            view = view[os.write(self.slave, view):]
            self._drain(0)  # keep the kernel's buffer from filling up
        return len(text)

    def flush(self):
        self._drain(0)

    def isatty(self):
        return True

    def fileno(self):
        return self.slave

    def _drain(self, timeout):
        while select.select([self.master], [], [], timeout)[0]:
            chunk = os.read(self.master, 65536)
            self.raw += chunk
            self.stream.feed(chunk)

    def transcript(self) -> list[str]:
        """Every line ever shown (scrolled-off ones first), trailing spaces and blank lines at the end dropped."""
        self._drain(0.2)  # the pty hands written bytes over asynchronously
        columns = self.screen.columns
        history = ["".join(line[x].data for x in range(columns)) for line in self.screen.history.top]
        lines = [line.rstrip() for line in history + list(self.screen.display)]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def close(self):
        os.close(self.slave)
        os.close(self.master)


def plain_transcript(text: str, columns: int) -> list[str]:
    """What a terminal of `columns` shows for plain `text` (soft wraps included), as PtyTerminal.transcript."""
    lines = []
    for line in text.split("\n"):
        while len(line) > columns:
            lines.append(line[:columns])
            line = line[columns:]
        lines.append(line.rstrip())
    while lines and not lines[-1]:
        lines.pop()
    return lines


@pytest.fixture(scope="module")
def tiny():
    model = LLaDAMoEForDiffusionLM.from_pretrained(TINY_ASSET_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_ASSET_DIR, trust_remote_code=False)
    return model, tokenizer


def answer_questions(model, tokenizer, file, streamer_factory, count=4):
    """The demo's loop before the fix: special tokens shown, so the confirmed answer ("1 1 3 4 5 <|role_end|>
    <|endoftext|> ...") and the second block's drafts wrap on an 80-column screen."""
    for task, digits in held_out_questions(count, seed=7):
        file.write(f"Q: {task} {' '.join(map(str, digits))}\nA: ")
        ids = tokenizer(chat_prompt(tokenizer, task, digits), return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            model.generate(**ids, streamer=streamer_factory(), **generation_kwargs(tokenizer))


def test_drafts_never_garble_a_scrolling_80x24_terminal(tiny):
    model, tokenizer = tiny
    terminal = PtyTerminal(80, 24)
    plain = PtyTerminal(80, 24)  # the same answers without drafts, for the expected screen
    try:
        for target in (terminal, plain):
            target.write("\n".join(f"line {i}" for i in range(30)) + "\n")  # the screen is full: every new line scrolls
        drawn = []

        class Recording(DiffusionStreamer):
            def _draw(self, text):
                super()._draw(text)
                drawn.append(text)

        answer_questions(model, tokenizer, terminal,
                         lambda: Recording(tokenizer, file=terminal, start_column=3, skip_special_tokens=False))
        answer_questions(model, tokenizer, plain,
                         lambda: DiffusionStreamer(tokenizer, file=plain, drafts=False, skip_special_tokens=False))
        assert len(drawn) == 4 * 16  # one draft per denoising step, all drawn
        assert max(len(text) for text in drawn) > 80  # some drafts are wider than the screen
        assert "\x1b7" in terminal.raw.decode() and not ESCAPE.search(plain.raw.decode())
        assert terminal.transcript() == plain.transcript()
        assert max(len(line) for line in terminal.transcript()) == 80  # the confirmed answers did wrap
    finally:
        terminal.close()
        plain.close()


def test_the_check_sees_garbage_from_save_restore_drafts(tiny):
    """The check above can fail: the same questions streamed with transformers' TextDiffusionStreamer (save the
    cursor, draw, restore) leave drafts on the screen once wrapped drafts have scrolled it (what the demo printed
    before DiffusionStreamer; `llada-moe demo` in an 80x24 terminal showed the same)."""
    model, tokenizer = tiny
    terminal = PtyTerminal(80, 24)
    try:
        terminal.write("\n" * 30)
        original_stdout = sys.stdout
        sys.stdout = terminal  # TextDiffusionStreamer prints to stdout
        try:
            answer_questions(model, tokenizer, terminal,
                             lambda: TextDiffusionStreamer(tokenizer, skip_prompt=True, skip_special_tokens=False))
        finally:
            sys.stdout = original_stdout
        garbage = [line for line in terminal.transcript() if line.count("<|mask|>") > 0]
        assert garbage, "no draft left on screen"
    finally:
        terminal.close()


def test_layout_fits_the_width():
    streamer = DiffusionStreamer(AutoTokenizer.from_pretrained(TINY_ASSET_DIR), file=PtyLike())
    text = "a" * 50 + "\n" + "宽" * 30 + "\u0301" + "b" * 200
    rows = streamer.layout(text, first=10, width=39, max_rows=5)
    assert len(rows) == 5 and rows[-1].endswith("…")
    assert sum(cell_width(c) for c in rows[0]) == 10
    assert all(sum(cell_width(c) for c in row) <= 39 for row in rows)
    assert streamer.layout("x" * 5, first=0, width=39, max_rows=3) == ["", "xxxxx"]  # no room left on the line
    assert streamer._sanitize("a\x1b[31mb\rc\td") == "a\ufffd[31mb\ufffdc    d"  # no terminal control from the model


class PtyLike:
    encoding = "utf-8"

    def isatty(self):
        return False

    def write(self, text):
        return len(text)

    def flush(self):
        pass


def test_pipe_gets_no_escape_codes(tiny):
    """On a file or pipe the streamer writes the confirmed text only: the same text as without streaming."""
    import io

    model, tokenizer = tiny
    out = io.StringIO()
    answer_questions(model, tokenizer, out,
                     lambda: DiffusionStreamer(tokenizer, file=out, sleep_time=5.0, skip_special_tokens=True), count=2)
    text = out.getvalue()
    assert not ESCAPE.search(text)
    assert re.findall(r"A: (.*)", text) == [
        " ".join(map(str, sorted(d) if t == "sort" else d[::-1])) for t, d in held_out_questions(2, seed=7)
    ]


def run_cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "llada_moe_hf.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, **kwargs)


@pytest.mark.slow  # a fresh Python process (10-20 s on the busy 2-core machine)
def test_generate_stream_into_a_pipe_is_plain_text():
    args = ["generate", str(TINY_ASSET_DIR), "--chat", "--prompt", "sort 3 1 4 1 5"]
    streamed = run_cli(args + ["--stream"])
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "1 1 3 4 5\n"  # no escape code, the answer cut at <|role_end|>, one newline


def spawn_in_pty(args, columns=80, lines=24):
    """Run the CLI with stdin and stdout on a pseudo-terminal and stderr on a pipe."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TERM="xterm")
    proc = subprocess.Popen([sys.executable, "-m", "llada_moe_hf.cli", *args], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, env=env, start_new_session=True, text=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    return proc, master


def read_until(master, pattern, timeout=120):
    import time

    seen, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"{pattern!r} not seen in {seen[-2000:]!r}")


@pytest.mark.slow  # a fresh Python process (10-20 s on the busy 2-core machine)
def test_generate_draws_drafts_on_a_terminal():
    proc, master = spawn_in_pty(["generate", str(TINY_ASSET_DIR), "--chat", "--prompt", "sort 3 1 4 1 5"])
    try:
        output = read_until(master, rb"1 1 3 4 5\r\n")
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        os.close(master)
    screen = pyte.Screen(80, 24)
    pyte.ByteStream(screen).feed(output)
    assert b"\x1b7" in output  # drafts were drawn (streaming is on by default on a terminal) ...
    assert [line.rstrip() for line in screen.display if line.strip()] == ["1 1 3 4 5"]  # ... and erased
