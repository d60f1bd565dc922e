"""`python -m export.runtime --engines DIR --image IMG --out OUT.mp4`: the serving image's entry point."""

from export.runtime.cli import generate

if __name__ == "__main__":
    generate()
