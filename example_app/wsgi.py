"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app`` (``make run``).

Monkey-patching comes first, before anything imports socket or threading.
(gunicorn's gevent worker patches too; this keeps other gevent servers right.)
"""

from gevent import monkey

monkey.patch_all()

# gunicorn imports this file as the top-level module `wsgi` (from inside example_app/); `flask amqp ...`
# run there finds it too, but imports it as `example_app.wsgi`, where `app` is a sibling module.
if __package__:
    from .app import create_app
else:
    from app import create_app  # type: ignore[no-redef]

app = create_app()
