-- The W3C trace context of the request that queued a call, so a call the retry worker runs
-- later stays in that request's trace. NULL when the request was not traced.
ALTER TABLE invitation.calls ADD COLUMN traceparent TEXT, ADD COLUMN tracestate TEXT;
