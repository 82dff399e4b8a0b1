"""The answer to an upload request survives the queue clear that starts a script run (app_pages.upload_fix)."""
from __future__ import annotations

from streamlit.proto.ForwardMsg_pb2 import ForwardMsg
from streamlit.runtime.forward_msg_queue import ForwardMsgQueue

from app_pages.upload_fix import keep_upload_answers


def _delta() -> ForwardMsg:
    msg = ForwardMsg()
    msg.metadata.delta_path[:] = [0, 0]
    msg.delta.new_element.markdown.body = "stale"
    return msg


def test_a_queued_upload_answer_outlives_a_new_script_run():
    keep_upload_answers()
    keep_upload_answers()  # once per process, however often the entry script runs
    queue = ForwardMsgQueue()
    answer = ForwardMsg()
    answer.file_urls_response.response_id = "r1"
    answer.file_urls_response.file_urls.add(file_id="f1", upload_url="/u/f1", delete_url="/d/f1")
    queue.enqueue(_delta())
    queue.enqueue(answer)
    queue.clear(retain_lifecycle_msgs=True)
    kinds = [msg.WhichOneof("type") for msg in queue.flush()]
    assert kinds == ["file_urls_response"]  # the stale delta went, the answer stayed
    assert queue.is_empty()  # flushed once, not again
    queue.enqueue(answer)
    queue.enqueue(_delta())
    queue.clear()
    assert queue.is_empty()  # a plain clear keeps nothing
