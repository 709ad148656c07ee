"""`python -m tune`: run a Ray Tune sweep (see tune.cli)."""

from tune.cli import main

if __name__ == "__main__":
    main()
