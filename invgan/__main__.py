from invgan.cli import app

app()
