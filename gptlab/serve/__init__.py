"""Serving: an OpenAI-compatible HTTP server (app.py) over the engine thread (runner.py), with request models
(protocol.py), response bodies (render.py), Prometheus metrics (metrics.py) and a browser playground."""
