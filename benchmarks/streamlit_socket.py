"""One Streamlit browser session spoken over the app's websocket, without a browser.

The load test's socket client: it sends what a browser sends (a page to run, then widget states, the layer
grid's click log among them) and reads what the server sends back, so the server's cores serve only the
server. Settle times end when the server's message arrives, without a browser's rendering.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import requests
import websockets
from streamlit.proto.BackMsg_pb2 import BackMsg
from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.proto.WidgetStates_pb2 import WidgetState


SIDEBAR = 1  # the root container of a delta's path: 0 the page, 1 the sidebar


class PageError(RuntimeError):
    """The page shows an error or an exception."""


class SocketSession:
    """A session on one page: the widgets it has drawn (by key), the texts it has shown with their arrival
    times, and the latest data of the page's custom component."""

    def __init__(self, url: str):
        self.url = url
        self.ids: dict[str, str] = {}  # widget key -> widget id
        self.states: dict[str, WidgetState] = {}  # widget id -> the value this client sent
        self.texts: list[tuple[float, str]] = []
        self.component: dict | None = None
        self.trouble: str | None = None
        self.page_hash = ""
        self.finished = asyncio.Event()
        self.changed = asyncio.Event()
        self.log: list[dict] = []
        self.epoch = f"socket{id(self):x}"
        self.session_id = ""
        self.upload_urls: asyncio.Queue = asyncio.Queue()

    async def open(self, page: str) -> None:
        stream = re.sub(r"^http", "ws", self.url) + "/_stcore/stream"
        self.socket = await websockets.connect(stream, subprotocols=["streamlit"], max_size=None, ping_interval=None)
        self.reader = asyncio.create_task(self._read())
        message = BackMsg()
        message.rerun_script.page_name = page
        message.rerun_script.context_info.url = f"{self.url}/{page}"
        await self._send(message)
        await self.idle()

    async def close(self) -> None:
        self.reader.cancel()
        await self.socket.close()

    async def _send(self, message: BackMsg) -> None:
        self.finished.clear()
        await self.socket.send(message.SerializeToString())

    async def _read(self) -> None:
        async for raw in self.socket:
            message = ForwardMsg()
            message.ParseFromString(raw)
            kind = message.WhichOneof("type")
            if kind == "new_session":
                self.session_id = message.new_session.initialize.session_id or self.session_id
            elif kind == "navigation":  # the page st.navigation ran: reruns name it by its hash
                self.page_hash = message.navigation.page_script_hash
            elif kind == "file_urls_response":
                self.upload_urls.put_nowait(message.file_urls_response)
            elif kind == "script_finished" and message.script_finished == message.FINISHED_SUCCESSFULLY:
                self.finished.set()  # not a run that stopped early for a newer one
            elif kind == "delta" and message.delta.WhichOneof("type") == "new_element":
                self._element(message.delta.new_element, in_sidebar=message.metadata.delta_path[:1] == [SIDEBAR])
            self.changed.set()

    def _element(self, element, in_sidebar: bool) -> None:
        kind = element.WhichOneof("type")
        body = getattr(element, kind)
        if hasattr(body, "id") and isinstance(body.id, str) and body.id.startswith("$$ID-"):
            self.ids[body.id.split("-", 2)[2]] = body.id
        if kind in ("heading", "markdown"):
            self.texts.append((time.monotonic(), body.body))
        elif kind == "bidi_component" and body.json:
            self.component = json.loads(body.json)
        elif kind == "exception" or (kind == "alert" and (body.format == body.ERROR or
                                                          (in_sidebar and body.format == body.WARNING))):
            self.trouble = body.message if kind == "exception" else body.body  # a sidebar warning: a fallback

    async def idle(self, timeout: float = 900) -> None:
        """Wait until the script run started last has finished."""
        await asyncio.wait_for(self.finished.wait(), timeout)
        self._raise_trouble()

    async def text(self, pattern: str, since: float, timeout: float = 900) -> float:
        """The arrival time of the first text matching `pattern` (a full match) shown after `since`."""
        async def found() -> float:
            while True:
                self._raise_trouble()
                for at, body in self.texts:
                    if at >= since and re.fullmatch(pattern, body):
                        return at
                self.changed.clear()
                await self.changed.wait()
        return await asyncio.wait_for(found(), timeout)

    def _raise_trouble(self) -> None:
        if self.trouble:
            raise PageError(f"the page shows: {self.trouble.strip()[:300]}")

    async def set_widget(self, key: str, **value) -> None:
        """Give the widget drawn with `key` a value (string_value=..., json_value=...) and rerun, as a browser
        does when a person changes it."""
        state = WidgetState(id=self.ids[key], **value)
        await self._rerun(state)

    async def _rerun(self, changed: WidgetState) -> None:
        """Rerun the page with every value this client has given its widgets, `changed` the newest."""
        self.states[changed.id] = changed
        message = BackMsg()
        message.rerun_script.page_script_hash = self.page_hash
        message.rerun_script.widget_states.widgets.extend(self.states.values())
        await self._send(message)

    def cells(self) -> list[dict]:
        """The grid's cells in the order a browser lays them out (rows, then columns)."""
        grid = self.component or {}
        at = {(cell["row"], cell["col"]): cell for cell in grid.get("cells", [])}
        return [at[(row, column)] for row in grid.get("rows", []) for column in grid.get("columns", [])
                if (row, column) in at]

    async def click_cell(self, key: str, index: int) -> None:
        """Click cell `index` of the grid drawn with `key`: the click log a browser's grid sends."""
        self.log.append({"seq": len(self.log) + 1, "layer": self.cells()[index]["layer"]})
        clicks = {"epoch": self.epoch, "log": self.log[-200:], "total": len(self.log)}
        await self.set_widget(key, json_value=json.dumps({"clicks": clicks}))

    async def upload(self, key: str, path: Path) -> None:
        """Put a file in the file uploader drawn with `key`, as a browser does: ask for an upload address,
        send the file there (with the XSRF token Streamlit checks), then give the widget the uploaded file."""
        request = BackMsg()
        request.file_urls_request.request_id = f"{self.epoch}-{len(self.states)}"
        request.file_urls_request.file_names.append(path.name)
        request.file_urls_request.session_id = self.session_id
        await self.socket.send(request.SerializeToString())
        answer = await asyncio.wait_for(self.upload_urls.get(), 120)
        if answer.error_msg or not answer.file_urls:
            raise PageError(f"the server refused the upload: {answer.error_msg}")
        urls = answer.file_urls[0]
        content = path.read_bytes()

        def put() -> None:
            with requests.Session() as http:
                http.get(self.url + "/_stcore/health", timeout=60)  # sets the XSRF cookie
                token = http.cookies.get("_streamlit_xsrf", "")
                http.put(self.url + urls.upload_url, files={"file": (path.name, content, "text/csv")},
                         headers={"X-Xsrftoken": token}, timeout=300).raise_for_status()

        await asyncio.to_thread(put)
        state = WidgetState(id=self.ids[key])
        state.file_uploader_state_value.uploaded_file_info.add(
            name=path.name, size=len(content), file_id=urls.file_id).file_urls.CopyFrom(urls)
        await self._rerun(state)
