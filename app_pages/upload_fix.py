"""A file picked while the server is busy must not hang: keep Streamlit's answers to upload requests.

The browser asks the server where to upload a picked file (a `file_urls_request`) and waits for the
answer (`file_urls_response`) before it sends the file. Streamlit 1.67 clears a session's outgoing queue
when a script run starts, keeping only lifecycle messages; an answer queued but not yet sent at that
moment is dropped, and the uploader waits forever with no error. On an idle server the answer leaves
within milliseconds; on a shared server whose cores are busy, with several sessions rerunning, the
window is wide: in an 8-session test 1 to 7 of 8 uploads were lost this way. The answer belongs to no
script run, so it survives the clear.
"""
from __future__ import annotations

import functools

from streamlit.runtime.forward_msg_queue import ForwardMsgQueue

_ANSWERS = ("file_urls_response",)


def keep_upload_answers() -> None:
    """Make ForwardMsgQueue.clear keep queued answers to upload requests (once per process)."""
    clear = ForwardMsgQueue.clear
    if getattr(clear, "_keeps_upload_answers", False):
        return

    @functools.wraps(clear)
    def clear_keeping_answers(self, retain_lifecycle_msgs: bool = False, **kwargs):
        # Only the clear that starts a run keeps lifecycle messages; flush() clears too, after taking them all.
        answers = [msg for msg in self._queue if msg.WhichOneof("type") in _ANSWERS] if retain_lifecycle_msgs else []
        clear(self, retain_lifecycle_msgs, **kwargs)
        self._queue.extend(msg for msg in answers if all(msg is not kept for kept in self._queue))

    clear_keeping_answers._keeps_upload_answers = True
    ForwardMsgQueue.clear = clear_keeping_answers
