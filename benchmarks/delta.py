"""Delta-rule and mLSTM cells, materialised vs chunked vs recurrence: see ``mixerdistill.bench.delta``."""

from mixerdistill.bench.delta import main

if __name__ == "__main__":
    main()
