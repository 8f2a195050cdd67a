from fcnify.cli import app

app(prog_name="fcnify")
