"""The clinicians' console: the live critical-result queue, acknowledgement with read-back, the shared
patient view, unprocessable results, notifications, access control and the audit trail.

`domain/` is pure (who may see what, queue order, read-back, statistics, notification routing);
`runtime/` holds the database, Kafka and senders; `web/` is the FastAPI wiring over both.
"""
