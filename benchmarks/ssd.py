"""SSD materialised vs chunked vs recurrence, time and memory: see ``mixerdistill.bench.ssd``."""

from mixerdistill.bench.ssd import main

if __name__ == "__main__":
    main()
