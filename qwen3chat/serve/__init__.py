"""`qwen3chat serve`: an OpenAI-compatible HTTP server over the engine.

protocol.py holds the request and response shapes and the OpenAI error object,
reply.py turns one request's engine events into reasoning, content and tool-call deltas
(stop strings included), tool_calls.py parses the tool calls Qwen models write,
runner.py runs the requests on the engine in a worker thread, and app.py is the ASGI
app (FastAPI on uvicorn): routes, authentication, server-sent events, metrics.
"""
