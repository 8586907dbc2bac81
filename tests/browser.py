"""Headless Chromium driven over the DevTools protocol through a pipe (no driver, no port).

``Chromium`` starts ``/usr/bin/chromium --remote-debugging-pipe`` (the protocol's JSON messages,
NUL-separated, on the child's file descriptors 3 and 4), opens one page and records what the
page does: console messages, uncaught exceptions, log entries and the URL of every request.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND",
]  # fmt: skip


class BrowserError(RuntimeError):
    """The browser answered a command with an error, or did not answer in time."""


@dataclass
class PageEvents:
    """What a page did since it was opened."""

    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    exceptions: list[str] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)  # (level, text)
    requests: list[str] = field(default_factory=list)  # every request's URL

    def errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions, and error log entries."""
        return (
            [
                f"console.{kind}: {text}"
                for kind, text in self.console
                if kind in ("error", "warning")
            ]
            + [f"exception: {text}" for text in self.exceptions]
            + [f"log {level}: {text}" for level, text in self.log if level in ("error", "warning")]
        )


class Chromium:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, width: int = 1200, height: int = 800, timeout: float = 60.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self.events = PageEvents()
        self._next_id = 0
        self._buffer = b""
        self._session: str | None = None

    def __enter__(self) -> Chromium:
        if not Path(CHROMIUM).is_file():
            raise FileNotFoundError(
                f"{CHROMIUM} not found: the map tests need Debian's chromium "
                "(apt-get install -y chromium; .ci/run installs it)"
            )
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()
        # The child's ends, above 3 and 4, which they are moved to in the child.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_child, from_child)]
        for fd in (to_child, from_child):
            os.close(fd)

        def wire() -> None:  # in the child: its fd 3 reads commands, fd 4 writes answers
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)

        self._process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", "--remote-debugging-pipe",
             f"--window-size={self.width},{self.height}", "about:blank"],
            preexec_fn=wire, close_fds=False,  # fds 3 and 4 stay open (inheritable)
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for fd in ends:
            os.close(fd)
        try:
            self._attach()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._process.poll() is None:
                self._send("Browser.close", session=False, wait=False)
                self._process.wait(timeout=10)
        except (OSError, BrowserError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            for fd in (self._read, self._write):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if self._process.stderr is not None:
                self._process.stderr.close()
            shutil.rmtree(self._profile, ignore_errors=True)

    # ------------------------------------------------------------------ protocol
    def _attach(self) -> None:
        targets = self._send("Target.getTargets", session=False)["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        reply = self._send("Target.attachToTarget", {"targetId": page, "flatten": True},
                           session=False)  # fmt: skip
        self._session = reply["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._send(f"{domain}.enable")
        self._send("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False,
        })  # fmt: skip

    def _send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True,
        wait: bool = True,
    ) -> dict[str, Any]:  # fmt: skip
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        if not wait:
            return {}
        wanted = self._next_id
        reply = self._pump(lambda m: m.get("id") == wanted)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def _pump(self, done: Any, timeout: float | None = None) -> dict[str, Any]:
        """Read messages (recording events) until ``done(message)``; return that message."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                self._record(message)
                if done(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or self._process.poll() is not None:
                raise BrowserError("no answer from the browser" + self._stderr_tail())
            ready, _, _ = select.select([self._read], [], [], left)
            if ready:
                chunk = os.read(self._read, 1 << 20)
                if not chunk:
                    raise BrowserError("the browser closed its pipe" + self._stderr_tail())
                self._buffer += chunk

    def _stderr_tail(self) -> str:
        if self._process.poll() is None or self._process.stderr is None:
            return ""
        return ": " + self._process.stderr.read().decode(errors="replace")[-2000:]

    def _record(self, message: dict[str, Any]) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.events.console.append((params["type"], text))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            description = details.get("exception", {}).get("description", "")
            self.events.exceptions.append(f"{details.get('text', '')} {description}".strip())
        elif method == "Log.entryAdded":
            entry = params["entry"]
            self.events.log.append((entry["level"], f"{entry['text']} {entry.get('url', '')}"))
        elif method == "Network.requestWillBeSent":
            self.events.requests.append(params["request"]["url"])

    # ------------------------------------------------------------------ page
    def open(self, path: str | os.PathLike[str]) -> None:
        """Load a local file and wait for its load event."""
        url = Path(path).resolve().as_uri()
        self._send("Page.navigate", {"url": url})
        self._pump(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        reply = self._send("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True,
        })  # fmt: skip
        if "exceptionDetails" in reply:
            raise BrowserError(f"{expression!r}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A left click at page coordinates ``(x, y)``."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self._send("Input.dispatchMouseEvent", {
                "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1,
            })  # fmt: skip

    def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.1)

    def screenshot(self, path: str | os.PathLike[str]) -> Path:
        """Save the viewport as a PNG."""
        data = self._send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
