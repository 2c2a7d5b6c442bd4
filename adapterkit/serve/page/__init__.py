"""The web page's files (plain HTML, JS and CSS, no build step), served by the app from this folder."""

from __future__ import annotations

import os

PAGE_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}  # name -> media type


def page_path(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
