"""`prodistill serve`: an HTTP service (Starlette on uvicorn) over the torch-free runtime.

Like `export.runtime`, it imports nothing of `prodistill` and never torch, so the serving image carries only
numpy, Pillow, PyAV, one inference backend and the ASGI stack. Modules: `request` (parsing and validating a
generation request), `worker` (the one thread that owns the engines), `metrics` (Prometheus), `app` (routes),
`cli` (the command).
"""
