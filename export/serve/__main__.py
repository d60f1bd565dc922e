from export.serve.cli import serve

serve(prog_name="python -m export.serve")
