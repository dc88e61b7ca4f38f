"""Stage 1's matrix loss, materialised vs blockwise: see ``mixerdistill.bench.stage1``."""

from mixerdistill.bench.stage1 import main

if __name__ == "__main__":
    main()
