"""The HTTP layer: the Flask app, its routes and hooks, OpenAI-shaped errors, and waitress serving it. Imports no Paddle."""
