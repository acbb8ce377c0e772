"""gunicorn settings for the example app: ``gunicorn -c gunicorn.conf.py wsgi:app``.

The three hooks imported below are what an AMQP app needs under gunicorn:

* ``pre_fork`` holds stop signals from the fork until the worker handles them,
  so a worker told to stop as it boots stops (gunicorn alone loses that signal).
* ``post_worker_init`` initialises each worker at boot, after the fork: it
  declares the topology, runs the ``on_initialise`` handlers and starts the
  listeners, so every worker consumes before its first request. A handler
  that raises makes gunicorn stop with "Worker failed to boot".
* ``worker_exit`` stops the listeners gracefully on SIGTERM/SIGINT (also
  while the worker still initialises: start-up is abandoned): consumers
  are cancelled at once, running callbacks finish (up to
  AMQP_SHUTDOWN_TIMEOUT) and are acked, connections close. Unacked messages
  go back to the queue.
"""

from flask_nucleon_amqp import gunicorn as amqp_hooks

# gunicorn calls the module-level functions of these names.
pre_fork = amqp_hooks.pre_fork
post_worker_init = amqp_hooks.post_worker_init
worker_exit = amqp_hooks.worker_exit

bind = "127.0.0.1:8000"
workers = 2
worker_class = "gevent"
worker_connections = 1000
#: Must exceed AMQP_SHUTDOWN_TIMEOUT (app.cfg), or callbacks are killed mid-way
#: (their messages are then redelivered, not lost).
graceful_timeout = 30
accesslog = "-"
