"""`python -m prodistill ...` (and `torchrun -m prodistill ...`) runs the same CLI as the `prodistill` script."""

from prodistill.entry import main

if __name__ == "__main__":
    main()
