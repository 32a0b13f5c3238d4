"""The notebook helpers: the ipywidgets chat, grounding boxes drawn on images, and the api.py exporter."""
