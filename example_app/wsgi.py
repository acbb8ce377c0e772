"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app`` (``make run``).

Monkey-patching comes first, before anything imports socket or threading.
(gunicorn's gevent worker patches too; this keeps other gevent servers right.)
"""

from gevent import monkey

monkey.patch_all()

from app import create_app  # noqa: E402

app = create_app()
