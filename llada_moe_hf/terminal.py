# Copyright 2026 The llada-moe-hf authors. Licensed under the Apache License, Version 2.0.
"""Streaming diffusion output to a terminal or a file: `DiffusionStreamer`.

A masked-diffusion sampler rewrites a whole block at every step, so a draft cannot simply be printed: it has to
be drawn and erased again. transformers' `TextDiffusionStreamer` saves the cursor position and restores it; once
the screen scrolls (a wrapped draft on the last line, on a 80x24 terminal after a few answers) the saved
position points at another line and the drafts stack into garbage, and the escape codes end up in files.

`DiffusionStreamer` instead:

* on a terminal, lays the draft out itself in rows that never reach the last column (it tracks the column the
  confirmed text ends at to know how much room the first row has), scrolls the screen for those rows before it
  saves the cursor position, and erases from that position down: no draft ever wraps or is drawn where a
  scroll has moved the saved position;
* anywhere else (a pipe, a file, `TERM=dumb`), writes the confirmed text only, block by block, with no escape
  codes at all.

Confirmed text follows `transformers.TextStreamer` (the same decoding and word-boundary rules), so the streamed
text equals the decoded answer. This module imports nothing from llada_moe_hf: the demo loads it by path in a
process that must not import the package.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import unicodedata

from transformers import TextStreamer


DRAFT_COLOR, RESET = "\033[33m", "\033[0m"  # drafts in yellow, as transformers' TextDiffusionStreamer


def is_terminal(file) -> bool:
    """True when `file` is a terminal that understands cursor movement (not a pipe, a file or TERM=dumb)."""
    try:
        return bool(file.isatty()) and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):  # closed or not a real file
        return False


def cell_width(char: str) -> int:
    """Columns a character takes on a terminal: 0 for combining marks, 2 for wide East Asian characters."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def terminal_size(file) -> os.terminal_size:
    try:
        return os.get_terminal_size(file.fileno())
    except (AttributeError, ValueError, OSError):
        return shutil.get_terminal_size()


class DiffusionStreamer(TextStreamer):
    """Streams `model.generate(..., streamer=...)`: drafts drawn in place on a terminal, plain text elsewhere.

    Args:
        tokenizer: decodes the tokens.
        skip_prompt (`bool`): do not print the prompt (default True).
        file: where to write (default `sys.stdout`).
        drafts (`bool`, *optional*): draw drafts; default: only when `file` is a terminal. Without drafts no
            escape code is ever written.
        start_column (`int`): the column the cursor is at when streaming starts (e.g. after a "A: " label).
        sleep_time (`float`, *optional*): pause after each draft (seconds), to watch the blocks form.
        stop_ids (iterable of `int`, *optional*): stop printing at the first of these ids (end of turn), so the
            streamed text is the answer that `generate`'s caller keeps.
        mask_text (`str`): what a `<|mask|>` position looks like in a draft (default "_").
        decode_kwargs: passed to `tokenizer.decode` (e.g. `skip_special_tokens=True`).
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, *, file=None, drafts: bool | None = None,
                 start_column: int = 0, sleep_time: float | None = None, stop_ids=None, mask_text: str = "_",
                 **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.file = file if file is not None else sys.stdout
        self.terminal = is_terminal(self.file)
        self.drafts = self.terminal if drafts is None else drafts
        self.column = start_column
        self.sleep_time = sleep_time
        self.stop_ids = set(stop_ids or ())
        self.mask_text = mask_text
        self._stopped = False
        self._drawn = None  # (rows below the first one, column of the first one) while a draft is on screen
        self._ellipsis = self._encodable("…", "...")
        self._replacement = self._encodable("\ufffd", "?")

    # ------------------------------------------------------------------------------------------ BaseStreamer

    def put(self, value):
        """Confirmed tokens (the prompt first, then each finished block): erase the draft, print them."""
        self.clear_draft()
        if self.skip_prompt and self.next_tokens_are_prompt:
            return super().put(value)
        if self._stopped:
            return
        ids = value.reshape(-1).tolist()
        for i, token in enumerate(ids):
            if token in self.stop_ids:
                value, self._stopped = value.reshape(-1)[:i], True
                break
        super().put(value.reshape(-1))

    def put_draft(self, value):
        """The current block after a denoising step: drawn in place of the previous draft (terminals only)."""
        if not self.drafts or self._stopped:
            return
        ids = value.reshape(-1).tolist()
        self.clear_draft()
        self._draw(self.draft_text(ids))
        if self.sleep_time:
            time.sleep(self.sleep_time)

    def end(self):
        self.clear_draft()
        super().end()
        self._stopped = False

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if stream_end:
            text += "\n"
        if self.drafts:
            text = self._sanitize(text)
        self.file.write(text)
        self.file.flush()
        self.column = self._advance(self.column, text)

    def abort(self):
        """Erase a draft left on screen (after an interrupt) and end the current line."""
        self.clear_draft()
        if self.column:
            self.file.write("\n")
            self.file.flush()
            self.column = 0
        self.token_cache, self.print_len, self.next_tokens_are_prompt, self._stopped = [], 0, True, False

    # ------------------------------------------------------------------------------------------ drafts

    def draft_text(self, ids: list[int]) -> str:
        """What follows the printed text: the held-back end of the confirmed text, then the draft block with
        `mask_text` for each mask token."""
        pending = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)[self.print_len :]
        before = self._decode_draft(self.token_cache)
        return pending + self._decode_draft(self.token_cache + ids)[len(before) :]

    def _decode_draft(self, ids: list[int]) -> str:
        kwargs = dict(self.decode_kwargs, skip_special_tokens=False)
        text = self.tokenizer.decode(ids, **kwargs)
        mask = getattr(self.tokenizer, "mask_token", None) or "<|mask|>"
        text = text.replace(mask, self.mask_text)
        if self.decode_kwargs.get("skip_special_tokens"):
            for token in getattr(self.tokenizer, "all_special_tokens", []):
                if token and token != mask:
                    text = text.replace(token, "")
        return text

    def clear_draft(self):
        if self._drawn is None:
            return
        # Back to where the draft began, erase from there to the end of the screen (only draft rows are below).
        self.file.write("\0338\033[J")
        self.file.flush()
        self._drawn = None

    def _draw(self, text: str):
        width, height = terminal_size(self.file)
        usable = max(width - 1, 1)  # never write the last column: no pending wrap to reason about
        column = self.column if self.column < width else 0  # a full line wrapped: the draft starts below
        rows = self.layout(self._sanitize(text), first=max(usable - column, 0), width=usable,
                           max_rows=max(height - 1, 1))
        below = len(rows) - 1
        # Make room first: index (ESC D) moves down one line in the same column and scrolls at the bottom; then
        # come back up. Once the rows exist nothing scrolls while the draft is drawn, so the saved cursor
        # position (ESC 7) still marks the draft's start when it is restored (ESC 8). Saving first and then
        # scrolling is what makes transformers' TextDiffusionStreamer stack drafts into garbage.
        prepare = ("\033D" * below + f"\033[{below}A") if below else ""
        color = os.environ.get("NO_COLOR") is None
        body = "\r\n".join(rows)
        self.file.write(prepare + "\0337" + ((DRAFT_COLOR + body + RESET) if color else body))
        self.file.flush()
        self._drawn = (below, column)

    def layout(self, text: str, first: int, width: int, max_rows: int) -> list[str]:
        """Split `text` into rows of at most `first` columns (the first row) and `width` columns (the others),
        at its line breaks and where a row is full; more than `max_rows` rows are cut, the last one ending in an
        ellipsis."""
        rows, row, used, limit = [], [], 0, first
        for char in text:
            if char == "\n":
                rows.append("".join(row))
                row, used, limit = [], 0, width
                continue
            char_width = cell_width(char)
            if used + char_width > limit:
                rows.append("".join(row))
                row, used, limit = [], 0, width
            row.append(char)
            used += char_width
        rows.append("".join(row))
        if len(rows) > max_rows:
            rows = rows[:max_rows]
            last_limit = first if max_rows == 1 else width
            rows[-1] = self._elide(rows[-1], last_limit)
        return rows

    def _elide(self, row: str, limit: int) -> str:
        room = limit - len(self._ellipsis)
        kept, used = [], 0
        for char in row:
            if used + cell_width(char) > room:
                break
            kept.append(char)
            used += cell_width(char)
        return "".join(kept) + self._ellipsis if room >= 0 else ""

    # ------------------------------------------------------------------------------------------ helpers

    def _sanitize(self, text: str) -> str:
        """Text safe to draw: tabs expanded, control characters (escape, carriage return, ...) replaced."""
        out = []
        for char in text:
            if char == "\t":
                out.append("    ")  # tab stops depend on the column: four spaces keep the column count exact
            elif char != "\n" and unicodedata.category(char) == "Cc":
                out.append(self._replacement)
            else:
                out.append(char)
        return "".join(out)

    def _advance(self, column: int, text: str) -> int:
        """The column after writing `text` at `column` on a terminal that wraps at its width."""
        width = terminal_size(self.file).columns if self.terminal else 1 << 30
        for char in text:
            if char == "\n":
                column = 0
                continue
            char_width = cell_width(char)
            if column + char_width > width:
                column = 0  # the terminal wrapped before this character
            column += char_width
        return column

    def _encodable(self, text: str, fallback: str) -> str:
        try:
            text.encode(getattr(self.file, "encoding", None) or "utf-8")
        except (UnicodeEncodeError, LookupError):
            return fallback
        return text


__all__ = ["DiffusionStreamer", "cell_width", "is_terminal"]
