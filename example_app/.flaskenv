# `flask amqp ...` from inside example_app/ (Flask reads this file with python-dotenv).
FLASK_APP=app
