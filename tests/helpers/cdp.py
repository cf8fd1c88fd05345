"""A minimal Chrome DevTools Protocol client over aiohttp, to drive Debian's headless chromium."""
from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from pathlib import Path


class Browser:
    """``async with Browser(exe, profile) as page:`` -> a :class:`Page` on a blank tab."""

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900):
        self.cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                    f"--window-size={width},{height}", "about:blank"]
        self.profile = Path(profile)
        self.proc: subprocess.Popen | None = None

    async def __aenter__(self) -> Page:
        import aiohttp
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        marker = self.profile / "DevToolsActivePort"
        deadline = time.time() + 30
        while not (marker.is_file() and marker.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(marker.read_text().split()[0])
        self.http = aiohttp.ClientSession()
        async with self.http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        self.ws = await self.http.ws_connect(url, max_msg_size=0)
        return Page(self.ws)

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params):
        message_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0):
        """Poll ``expression`` until it is truthy; return its value."""
        deadline, error = time.time() + timeout, None
        while time.time() < deadline:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as exc:  # e.g. the page is still loading
                value, error = None, exc
            if value:
                return value
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{expression} stayed falsy for {timeout}s (last error: {error})")

    async def set_files(self, selector: str, paths: list[str]) -> None:
        root = (await self.call("DOM.getDocument"))["root"]["nodeId"]
        node = (await self.call("DOM.querySelector", nodeId=root, selector=selector))["nodeId"]
        await self.call("DOM.setFileInputFiles", nodeId=node, files=paths)
