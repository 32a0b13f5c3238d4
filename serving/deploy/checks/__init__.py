"""The preflight's checks, one module per kind: files, imports, api.py, the runtime, the engine."""
