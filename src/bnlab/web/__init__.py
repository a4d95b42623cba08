"""bnlab.web: ``bnlab serve``, the live web app (interface layer; nothing in bnlab imports it).

:func:`bnlab.web.app.create_app` builds the FastAPI app; :mod:`bnlab.web.jobs` trains each
session's two networks on one worker thread; :mod:`bnlab.web.schema` validates every message
from the page; :mod:`bnlab.web.views` computes views 1, 3 and 4 with bnlab's own code.
"""
