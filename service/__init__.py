"""The shared server's process-wide services, beside the pages: the scheduler all CPU work of all sessions queues in."""
