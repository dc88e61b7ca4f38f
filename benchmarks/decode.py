"""Decode latency and cache memory, student vs teacher: see mixerdistill/bench/decode.py."""

from mixerdistill.bench.decode import main

if __name__ == "__main__":
    main()
