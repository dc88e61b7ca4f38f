"""Training throughput of each stage against a bare loop and the matmul peak: see ``mixerdistill.bench.training``."""

from mixerdistill.bench.training import main

if __name__ == "__main__":
    main()
