# `flask amqp ...` from the repository root uses the example app (Flask reads this file with python-dotenv).
FLASK_APP=example_app
