"""`diladiff serve RUN [RUN ...]`: a local web playground that shows a model denoise step by
step (server.py: the HTTP server and its API; stream.py: one generation with its steps;
page.html: the page). Standard library only; nothing is fetched from the network.
"""

from diladiff.serve.server import Playground, serve

__all__ = ["Playground", "serve"]
