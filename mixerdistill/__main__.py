"""``python -m mixerdistill`` behaves like the ``mixerdistill`` command."""

from mixerdistill.cli import main

if __name__ == "__main__":
    main()
