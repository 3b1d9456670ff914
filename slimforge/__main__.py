from slimforge.cli import app

app()
